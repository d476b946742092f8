//! A test fixture, not an example: an event hook that misbehaves on
//! purpose, the way its `config` says.
//!
//! - `{"mode":"ok"}` returns Ok.
//! - `{"mode":"error"}` returns an error.
//! - `{"mode":"trap"}` panics, which traps.
//! - `{"mode":"loop"}` never returns.
//! - `{"mode":"alloc"}` allocates (and touches) memory without bound.
//! - `{"mode":"read","key":"/k"}` reads `/k` with `get-key` and logs
//!   `key=/k value=<utf-8>` or `key=/k absent`.
//! - `{"mode":"file","path":"/p"}` reads the file `/p` and logs
//!   `file=/p content=<utf-8>`, or fails saying why it could not.
//! - `{"mode":"env"}` logs its whole environment: `env=K=V,K=V`.
//! - `{"mode":"hold","who":"a","ms":500}` logs `hold who=a start=<ns>`,
//!   waits `ms` milliseconds, then logs `hold who=a end=<ns>` (`<ns>`: the
//!   wall clock in nanoseconds since the Unix epoch), so runs on several
//!   agents of one host can be ordered.
//! - `{"mode":"by-lock"}` takes the mode from the lock name of a
//!   `lock-acquired` or `lock-lost` event (`loop`, `ok`, …), so one loaded
//!   plugin can misbehave in one call and behave in the next.

wit_bindgen::generate!({
    world: "event-hook",
    path: "../wit/0.1.0",
});

use coord::hooks::host::{Level, config, get_key, log};
use coord::hooks::types::{Envelope, Event};
use exports::coord::hooks::event_handler::Guest;

struct Misbehave;

impl Guest for Misbehave {
    fn handle(envelope: Envelope) -> Result<(), String> {
        let config: serde_json::Value =
            serde_json::from_str(&config()).map_err(|e| format!("bad config: {e}"))?;
        let mode = match (config["mode"].as_str(), &envelope.event) {
            (Some("by-lock"), Event::LockAcquired(l)) => Some(l.lock.as_str()),
            (Some("by-lock"), Event::LockLost(l)) => Some(l.lock.as_str()),
            (Some("by-lock"), _) => return Err("by-lock mode needs a lock event".into()),
            (mode, _) => mode,
        };
        match mode {
            Some("ok") => Ok(()),
            Some("error") => Err("misbehave: failing as configured".into()),
            Some("trap") => panic!("misbehave: trapping as configured"),
            Some("loop") => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            Some("alloc") => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Filled, so the pages are really used.
                    hoard.push(vec![0xA5; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            Some("read") => {
                let key = config["key"].as_str().ok_or("read mode needs `key`")?;
                match get_key(key) {
                    Some(v) => log(
                        Level::Info,
                        &format!("key={key} value={}", String::from_utf8_lossy(&v)),
                    ),
                    None => log(Level::Info, &format!("key={key} absent")),
                }
                Ok(())
            }
            Some("file") => {
                let path = config["path"].as_str().ok_or("file mode needs `path`")?;
                let content = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {path}: {e}"))?;
                log(Level::Info, &format!("file={path} content={content}"));
                Ok(())
            }
            Some("hold") => {
                let who = config["who"].as_str().unwrap_or("?");
                let ms = config["ms"].as_u64().ok_or("hold mode needs `ms`")?;
                let wall = || {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos())
                };
                log(Level::Info, &format!("hold who={who} start={}", wall()));
                std::thread::sleep(std::time::Duration::from_millis(ms));
                log(Level::Info, &format!("hold who={who} end={}", wall()));
                Ok(())
            }
            Some("env") => {
                let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
                log(Level::Info, &format!("env={}", vars.join(",")));
                Ok(())
            }
            other => Err(format!("unknown mode {other:?}")),
        }
    }
}

export!(Misbehave);
