//! Instructions → LLB definition and image config.

use crate::frontend::{BuildOpts, Converted, Error, ImageRef, ResolvedImages, Result};

/// The images a Dockerfile refers to for these options (FROM and COPY --from=image).
pub fn required_images(_src: &str, opts: &BuildOpts) -> Result<Vec<ImageRef>> {
    Err(Error::General {
        file: opts.filename.clone(),
        message: "dockerfile frontend not implemented yet".to_string(),
    })
}

/// Converts a Dockerfile to LLB and an image config.
pub fn convert(_src: &str, opts: &BuildOpts, _images: &ResolvedImages) -> Result<Converted> {
    Err(Error::General {
        file: opts.filename.clone(),
        message: "dockerfile frontend not implemented yet".to_string(),
    })
}
