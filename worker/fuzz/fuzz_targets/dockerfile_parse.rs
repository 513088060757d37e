//! Parses and converts arbitrary Dockerfile text with placeholder base images: any
//! input must give a result or an error, never a panic.
#![no_main]

use kiln_worker::frontend::dockerfile::{convert, required_images};
use kiln_worker::frontend::{BuildOpts, ResolvedImageMeta, ResolvedImages};
use kiln_worker::image::{ImageConfigFile, Platform};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let opts = BuildOpts {
        filename: "Dockerfile".to_string(),
        build_platform: Platform {
            os: "linux".to_string(),
            architecture: "amd64".to_string(),
            variant: String::new(),
        },
        context_name: "context".to_string(),
        ..Default::default()
    };
    let Ok(refs) = required_images(src, &opts) else {
        return;
    };
    let mut images = ResolvedImages::new();
    for r in refs {
        let mut config = ImageConfigFile::default();
        // Exercise ONBUILD triggers too: the trigger text comes from the input.
        if let Some(line) = src.lines().find(|l| l.starts_with("#trigger ")) {
            config.config.on_build = vec![line["#trigger ".len()..].to_string()];
        }
        images.insert(
            r.clone(),
            ResolvedImageMeta {
                canonical: r.reference.clone(),
                digest: format!("sha256:{}", "0".repeat(64)),
                config,
            },
        );
    }
    let _ = convert(src, &opts, &images);
});
