//! Reading a component's TOML configuration: one file, unknown keys refused by the component's
//! own `serde(deny_unknown_fields)` types, errors that name the file and (toml's words) the line
//! and field. The CCF and the gateway read their files through it.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown/missing fields (the message names line and field).
    #[error("{origin}: {message}")]
    Parse {
        /// The file name, or what the text is (e.g. "embedded demo config").
        origin: String,
        /// toml's message, with line, column and field.
        message: String,
    },
}

/// Parses TOML text; `origin` names it in errors.
pub fn parse<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        origin: origin.to_string(),
        message: e.to_string(),
    })
}

/// Reads and parses a file.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}
