//! Compiles `proto/capif/v1/*.proto` into Rust and a file descriptor set for server reflection.
//!
//! `protoc` comes from the `protoc-bin-vendored` crate unless `PROTOC` is set, so a fresh machine
//! needs no system package. tonic-prost-build prints no `rerun-if-changed` for the .proto files,
//! and any rerun directive we print switches Cargo's default "rerun on any change" off, so the
//! proto directory is named explicitly: without it a .proto edit would be silently ignored.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("PROTOC", protoc)
        };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let files = [
        "proto/capif/v1/common.proto",
        "proto/capif/v1/invoker_management.proto",
        "proto/capif/v1/security.proto",
        "proto/capif/v1/aef_security.proto",
        "proto/capif/v1/interconnect.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("capif_descriptor.bin"))
        // Messages that carry secrets get a hand-written, redacting Debug (src/redact.rs).
        .skip_debug([
            "capif.v1.InvokerSecurityInformation",
            "capif.v1.OnboardingInformation",
            "capif.v1.AccessTokenRsp",
        ])
        .compile_protos(&files, &["proto"])?;
    Ok(())
}
