//! An event hook that logs every event as one structured line through the
//! agent's log: the event type first, then its key fields as `key=value`.
//!
//! ```text
//! INFO hook="audit" event=lock-acquired agent=web-01 lock=reports fencing_token=42
//! ```

wit_bindgen::generate!({
    world: "event-hook",
    path: "../wit/0.1.0",
});

use coord::hooks::host::{Level, log};
use coord::hooks::types::{Envelope, Event, Health};
use exports::coord::hooks::event_handler::Guest;

struct LogEvents;

impl Guest for LogEvents {
    fn handle(envelope: Envelope) -> Result<(), String> {
        log(Level::Info, &summary(&envelope));
        Ok(())
    }
}

export!(LogEvents);

/// `event=<type> agent=<name> <field>=<value>…`; absent options print `-`.
fn summary(e: &Envelope) -> String {
    let mut line = Line::default();
    let name = match &e.event {
        Event::FileChanged(_) => "file-changed",
        Event::ValidateFile(_) => "validate-file",
        Event::ServiceHealthChanged(_) => "service-health-changed",
        Event::LockAcquired(_) => "lock-acquired",
        Event::LockLost(_) => "lock-lost",
        Event::TaskFinished(_) => "task-finished",
        Event::InstanceIdClaimed(_) => "instance-id-claimed",
        Event::InstanceIdLost(_) => "instance-id-lost",
    };
    line.field("event", name);
    line.field("agent", &e.agent);
    match &e.event {
        Event::FileChanged(f) => {
            line.field("path", &f.path);
            line.field("old_hash", opt(&f.old_hash));
            line.field("new_hash", &f.new_hash);
        }
        Event::ValidateFile(v) => {
            line.field("path", &v.path);
            line.field("staged_path", &v.staged_path);
            line.field("bytes", &v.content.len().to_string());
        }
        Event::ServiceHealthChanged(s) => {
            line.field("service", &s.service);
            line.field("instance", &s.instance);
            line.field("old", s.old.map_or("-", health));
            line.field("new", health(s.new));
        }
        Event::LockAcquired(l) => {
            line.field("lock", &l.lock);
            line.field("fencing_token", &l.fencing_token.to_string());
        }
        Event::LockLost(l) => {
            line.field("lock", &l.lock);
            line.field("fencing_token", &l.fencing_token.to_string());
        }
        Event::TaskFinished(t) => {
            line.field("task", &t.task);
            line.field("fencing_token", &t.fencing_token.to_string());
            line.field(
                "exit_code",
                &t.exit_code.map_or("-".into(), |c| c.to_string()),
            );
            line.field("signal", &t.signal.map_or("-".into(), |s| s.to_string()));
        }
        Event::InstanceIdClaimed(i) => {
            line.field("pool", &i.pool);
            line.field("id", &i.id.to_string());
            line.field("generation", &i.generation.to_string());
        }
        Event::InstanceIdLost(i) => {
            line.field("pool", &i.pool);
            line.field("id", &i.id.to_string());
        }
    }
    line.0
}

fn opt(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

fn health(h: Health) -> &'static str {
    match h {
        Health::Passing => "passing",
        Health::Warning => "warning",
        Health::Critical => "critical",
        Health::Maintenance => "maintenance",
    }
}

#[derive(Default)]
struct Line(String);

impl Line {
    /// Appends `key=value`, quoting values that are empty or hold spaces,
    /// quotes or `=` so the line stays parseable.
    fn field(&mut self, key: &str, value: &str) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        self.0.push_str(key);
        self.0.push('=');
        let plain = !value.is_empty()
            && !value
                .chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '=' || c.is_control());
        if plain {
            self.0.push_str(value);
        } else {
            self.0.push_str(&format!("{value:?}"));
        }
    }
}
