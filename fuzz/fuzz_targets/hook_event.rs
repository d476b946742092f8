//! Any hook event — built from the fuzz bytes, strings from etcd being
//! whatever bytes they are — encodes to JSON that parses back equal, and to
//! a `COORD_*` environment a process can be started with (no NUL anywhere,
//! names without `=`).

#![no_main]

use arbitrary::{Result, Unstructured};
use coord::agent::hooks::{Envelope, Event, Health};
use libfuzzer_sys::fuzz_target;

fn health(u: &mut Unstructured<'_>) -> Result<Health> {
    Ok(*u.choose(&[
        Health::Passing,
        Health::Warning,
        Health::Critical,
        Health::Maintenance,
    ])?)
}

fn event(u: &mut Unstructured<'_>) -> Result<Event> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => Event::FileChanged {
            path: u.arbitrary()?,
            old_hash: u.arbitrary()?,
            new_hash: u.arbitrary()?,
        },
        1 => Event::ValidateFile {
            path: u.arbitrary()?,
            staged_path: u.arbitrary()?,
            content: u.arbitrary()?,
        },
        2 => Event::ServiceHealthChanged {
            service: u.arbitrary()?,
            instance: u.arbitrary()?,
            old: if u.arbitrary()? { Some(health(u)?) } else { None },
            new: health(u)?,
        },
        3 => Event::LockAcquired {
            lock: u.arbitrary()?,
            fencing_token: u.arbitrary()?,
        },
        4 => Event::LockLost {
            lock: u.arbitrary()?,
            fencing_token: u.arbitrary()?,
        },
        5 => Event::TaskFinished {
            task: u.arbitrary()?,
            fencing_token: u.arbitrary()?,
            exit_code: u.arbitrary()?,
            signal: u.arbitrary()?,
        },
        6 => Event::InstanceIdClaimed {
            pool: u.arbitrary()?,
            id: u.arbitrary()?,
            generation: u.arbitrary()?,
        },
        _ => Event::InstanceIdLost {
            pool: u.arbitrary()?,
            id: u.arbitrary()?,
        },
    })
}

fn envelope(u: &mut Unstructured<'_>) -> Result<Envelope> {
    Ok(Envelope {
        schema: u.arbitrary()?,
        agent: u.arbitrary()?,
        time: u.arbitrary()?,
        event: event(u)?,
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(envelope) = envelope(&mut u) else {
        return;
    };
    let json = envelope.to_json();
    let back: Envelope = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("the JSON of {envelope:?} does not parse back ({e}): {json}"));
    assert_eq!(back, envelope, "JSON round trip: {json}");
    for (name, value) in envelope.env() {
        assert!(
            name.starts_with("COORD_") && !name.contains(['=', '\0']),
            "{name:?} cannot name a variable"
        );
        assert!(!value.contains('\0'), "{name}={value:?}: a NUL cannot reach a process");
    }
});

