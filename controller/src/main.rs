//! `kiln-controller`: not implemented yet; it reports its version and exits with an error
//! saying so.

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("kiln-controller {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    anyhow::bail!("kiln-controller is not implemented yet")
}
