//! Network and dependency faults for whole-system tests: a loopback TCP forwarder that can
//! be partitioned (current connections dropped, new ones black-holed) and healed
//! ([`Forwarder`]), and a `docker-registry` that can be stopped and started again on the
//! same port with the same storage ([`StoppableRegistry`]).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A TCP forwarder on `127.0.0.1:<free port>` to one target address. While partitioned,
/// it accepts connections and never forwards a byte nor closes them (a black hole, as a
/// dropped route looks to both ends); [`Forwarder::heal`] closes those and forwards again.
#[derive(Debug)]
pub struct Forwarder {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    partitioned: AtomicBool,
    /// Open connections stop carrying bytes (but stay open) while set.
    frozen: AtomicBool,
    stop: AtomicBool,
    /// Bytes per second each direction of a connection may carry (0: unlimited).
    rate: AtomicU64,
    /// Bytes forwarded so far, both directions.
    bytes: AtomicU64,
    /// Both ends of every forwarded connection, to cut them on a partition.
    live: Mutex<Vec<TcpStream>>,
    /// Connections accepted while partitioned, held open and never served.
    held: Mutex<Vec<TcpStream>>,
}

impl Forwarder {
    /// Starts forwarding from a free loopback port to `target` (`host:port`).
    pub fn start(target: &str) -> anyhow::Result<Forwarder> {
        let target: SocketAddr = target
            .parse()
            .with_context(|| format!("forwarder target {target:?} is not host:port"))?;
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the forwarder")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            partitioned: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            rate: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            live: Mutex::new(Vec::new()),
            held: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || accept_loop(listener, s));
        Ok(Forwarder {
            addr,
            shared,
            thread: Some(thread),
        })
    }

    /// Where clients connect: `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Cuts every forwarded connection and black-holes new ones until [`Forwarder::heal`].
    pub fn partition(&self) {
        self.shared.partitioned.store(true, Ordering::SeqCst);
        cut(&self.shared.live);
    }

    /// Limits each direction of every connection to `bytes_per_sec` (0: unlimited), so
    /// that a transfer through the forwarder takes a known minimum time.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Bytes read for forwarding so far (both directions, all connections).
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::SeqCst)
    }

    /// A silent partition: open connections stay open but carry nothing (no FIN, no
    /// RST, as when packets are dropped on the way), new ones are black-holed, until
    /// [`Forwarder::heal`].
    pub fn freeze(&self) {
        self.shared.frozen.store(true, Ordering::SeqCst);
        self.shared.partitioned.store(true, Ordering::SeqCst);
    }

    /// Closes the black-holed connections and forwards new ones again (and open ones,
    /// after a freeze).
    pub fn heal(&self) {
        self.shared.frozen.store(false, Ordering::SeqCst);
        self.shared.partitioned.store(false, Ordering::SeqCst);
        cut(&self.shared.held);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        cut(&self.shared.live);
        cut(&self.shared.held);
        // Wake the blocking accept.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn cut(list: &Mutex<Vec<TcpStream>>) {
    let mut l = list.lock().unwrap_or_else(|e| e.into_inner());
    for s in l.drain(..) {
        let _ = s.shutdown(Shutdown::Both);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if shared.partitioned.load(Ordering::SeqCst) {
            shared
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(client);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&shared.target, Duration::from_secs(2)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let clones = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        );
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = clones else {
            continue;
        };
        {
            let mut live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
            live.retain(|s| s.peer_addr().is_ok());
            live.push(c3);
            live.push(s3);
        }
        let (a, b) = (shared.clone(), shared.clone());
        std::thread::spawn(move || pump(client, server, &a));
        std::thread::spawn(move || pump(s2, c2, &b));
    }
}

/// Copies `from` into `to` until either side ends, then closes the write half of `to`;
/// sleeps after each chunk as the rate limit asks.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // Frozen: the chunk waits (and nothing more is read) until healed.
                while shared.frozen.load(Ordering::SeqCst) {
                    if shared.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                shared.bytes.fetch_add(n as u64, Ordering::SeqCst);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                let rate = shared.rate.load(Ordering::SeqCst);
                if rate > 0 {
                    std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A `docker-registry` (no auth, plain HTTP) on a fixed loopback port, storing under a
/// directory it keeps across [`StoppableRegistry::stop`] and [`StoppableRegistry::start`].
/// Killed on drop; the directory belongs to the caller.
#[derive(Debug)]
pub struct StoppableRegistry {
    addr: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl StoppableRegistry {
    /// Starts a registry on a free loopback port with its storage and config under `dir`
    /// (created); returns once `GET /v2/` answers 200.
    pub fn start_in(dir: &Path) -> anyhow::Result<StoppableRegistry> {
        std::fs::create_dir_all(dir.join("storage"))
            .with_context(|| format!("create {}", dir.display()))?;
        let port = crate::fleet::free_port()?;
        let mut r = StoppableRegistry {
            addr: format!("127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
            child: None,
        };
        r.start()?;
        Ok(r)
    }

    /// `127.0.0.1:PORT`, the same across restarts.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// Kills the registry (SIGKILL) and waits until its port refuses connections.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let start = Instant::now();
        while TcpStream::connect(&self.addr).is_ok() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("registry at {} still accepts after being killed", self.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// (Re)starts the registry on its port with its storage; returns once `GET /v2/`
    /// answers 200.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("registry at {} is already running", self.addr);
        }
        let config = self.dir.join("config.yml");
        let yml = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {}\n",
            self.dir.join("storage").display(),
            self.addr
        );
        std::fs::write(&config, yml).with_context(|| format!("write {}", config.display()))?;
        let log_path = self.dir.join("registry.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("open {}", log_path.display()))?;
        let mut child = Command::new(crate::registry::REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", crate::registry::REGISTRY_BIN))?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("registry at {} exited early ({status}): {log}", self.addr);
            }
            if crate::http::get(&self.addr, "/v2/", &[]).is_ok_and(|r| r.status == 200) {
                break;
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("registry at {} not ready after 15 s", self.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for StoppableRegistry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port, one thread per connection.
    fn echo() -> anyhow::Result<String> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = c;
                    let mut w = match r.try_clone() {
                        Ok(w) => w,
                        Err(_) => return,
                    };
                    let _ = std::io::copy(&mut r, &mut w);
                });
            }
        });
        Ok(addr)
    }

    fn roundtrip(addr: &str, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(msg)?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf)?;
        Ok(buf)
    }

    #[test]
    fn forwards_partitions_and_heals() -> anyhow::Result<()> {
        let f = Forwarder::start(&echo()?)?;
        assert_eq!(roundtrip(&f.addr(), b"one")?, b"one");
        let mut open = TcpStream::connect(f.addr())?;
        open.write_all(b"x")?;
        let mut b = [0u8; 1];
        open.read_exact(&mut b)?;

        f.partition();
        // The open connection is cut; a new one is accepted but never answered.
        open.set_read_timeout(Some(Duration::from_secs(5)))?;
        let cut = open.read(&mut b);
        assert!(matches!(cut, Ok(0) | Err(_)), "{cut:?}");
        let held = roundtrip(&f.addr(), b"two");
        let err = held.expect_err("a partitioned forwarder answered");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );

        f.heal();
        assert_eq!(roundtrip(&f.addr(), b"three")?, b"three");
        // At least what the client sent (counted before it is forwarded, so before any echo).
        assert!(f.bytes() >= 3 + 1 + 5, "{} bytes counted", f.bytes());
        Ok(())
    }

    #[test]
    fn bad_target_is_named() {
        let err = Forwarder::start("not-an-addr").expect_err("accepted a bad target");
        assert!(err.to_string().contains("not-an-addr"), "{err}");
    }
}
