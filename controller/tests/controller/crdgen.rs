//! The checked-in CRD YAML must equal what `crdgen` generates from the Rust types.

use std::path::Path;

#[test]
fn checked_in_crds_match_the_types() -> anyhow::Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir()?;
    let written = kiln_controller::crdgen::write_all(tmp.path())?;
    assert_eq!(written.len(), 4, "two CRDs into two directories");
    let mut drift = Vec::new();
    for path in written {
        let rel = path.strip_prefix(tmp.path())?;
        let fresh = std::fs::read_to_string(&path)?;
        match std::fs::read_to_string(repo.join(rel)) {
            Ok(old) if old == fresh => {}
            Ok(_) => drift.push(format!("{} differs", rel.display())),
            Err(e) => drift.push(format!("{} unreadable: {e}", rel.display())),
        }
    }
    assert!(
        drift.is_empty(),
        "CRD YAML is out of date with controller/src/crd.rs: {drift:?}\n\
         regenerate with: cargo run -p kiln-controller -- crdgen --root ."
    );
    Ok(())
}
