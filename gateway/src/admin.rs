//! The operator's admin endpoint (plain HTTP, loopback only, off unless `--admin-addr`
//! is given): `GET /workers` lists the pool, `POST /drain?worker=NAME` stops new builds
//! going to a worker while its running builds go on, `POST /undrain?worker=NAME` undoes
//! it. Uses [`crate::health`] and the HTTP server of [`crate::metrics`].

use crate::health::Pool;
use crate::metrics::serve_http;

/// The answer to one admin request: status code and text body.
pub fn handle(pool: &Pool, method: &str, path: &str) -> (u16, String) {
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    match (method, route) {
        ("GET", "/workers") => {
            let mut out = String::new();
            for w in pool.workers() {
                let limit = match w.limit() {
                    0 => "unlimited".to_string(),
                    n => n.to_string(),
                };
                out.push_str(&format!(
                    "{} {} healthy={} draining={} inflight={} queued={} limit={limit}\n",
                    w.name,
                    w.addr,
                    w.is_healthy(),
                    w.is_draining(),
                    w.inflight(),
                    w.queued(),
                ));
            }
            (200, out)
        }
        ("POST", "/drain" | "/undrain") => {
            let Some(name) = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("worker="))
                .filter(|n| !n.is_empty())
            else {
                return (400, format!("{route}: missing ?worker=NAME\n"));
            };
            let draining = route == "/drain";
            if pool.set_draining(name, draining) {
                (200, format!("{name}: draining={draining}\n"))
            } else {
                (404, format!("{route}: no worker named {name:?}\n"))
            }
        }
        (_, "/workers" | "/drain" | "/undrain") => {
            (405, format!("{method} {route}: not allowed\n"))
        }
        _ => (404, "not found\n".to_string()),
    }
}

/// Serves the admin endpoint on `listener` forever.
pub async fn serve(pool: Pool, listener: tokio::net::TcpListener) {
    serve_http(listener, move |method: &str, path: &str| {
        handle(&pool, method, path)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Member;
    use crate::metrics::Metrics;

    #[tokio::test]
    async fn drain_and_undrain() {
        let pool = Pool::new(10, 1.25, Metrics::new().expect("metrics"));
        pool.set_members(&[Member {
            name: "w0".into(),
            addr: "tcp://127.0.0.1:9".into(),
        }])
        .expect("members");
        assert_eq!(handle(&pool, "POST", "/drain?worker=w0").0, 200);
        assert!(pool.get("w0").is_some_and(|w| w.is_draining()));
        let (code, body) = handle(&pool, "GET", "/workers");
        assert_eq!(code, 200);
        assert!(body.contains("w0 tcp://127.0.0.1:9") && body.contains("draining=true"));
        assert!(body.contains("queued=0 limit=unlimited"), "{body}");
        assert_eq!(handle(&pool, "POST", "/undrain?worker=w0").0, 200);
        assert!(pool.get("w0").is_some_and(|w| !w.is_draining()));
        let (code, body) = handle(&pool, "POST", "/drain?worker=nope");
        assert_eq!(code, 404);
        assert!(body.contains("nope"));
        assert_eq!(handle(&pool, "POST", "/drain").0, 400);
        assert_eq!(handle(&pool, "GET", "/drain?worker=w0").0, 405);
    }
}
