//! `kiln-worker`: the worker daemon. The BuildKit Control API it will serve is tracked
//! separately; until then it only reports its version.

fn main() -> anyhow::Result<()> {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version") | Some("-v") => {
            println!("kiln-worker {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        _ => anyhow::bail!(
            "kiln-worker: the daemon API (BuildKit Control service) is not implemented yet; use `kiln build` (daemonless)"
        ),
    }
}
