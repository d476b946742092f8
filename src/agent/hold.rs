//! Holding a claim while a command runs — one way for `coord lock`,
//! `coord ids claim` and `[[task]]` ([`Holding`], and [`hold_and_run`] for
//! one run): start the supervisor, claim, build the environment, run
//! guarded, release.
//!
//! What is promised (ARCHITECTURE.md, invariant 14):
//! - the command runs only while the claim's key exists on a live lease:
//!   every renewed deadline goes to the supervisor, a lost lease or a key
//!   deleted by hand (`etcdctl del`) stops the command (TERM, grace, KILL);
//! - nothing is released while any process the command started may still
//!   run: [`Supervised::wait`] returns only once none does, even when the
//!   supervisor itself was killed;
//! - a release that fails is retried while the lease lives, so no key of
//!   a finished run is left on a live lease.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::supervise::Supervised;
use crate::etcd::{Backoff, Client, LeaseId, SessionState};

/// Something held in etcd by one key on a session lease: a lock, an id.
pub trait Claim {
    /// The key whose existence is the claim.
    fn key(&self) -> &str;
    /// The key's create revision (a lock's fencing token, an id's
    /// generation).
    fn created(&self) -> i64;
    /// The lease it hangs off.
    fn lease(&self) -> LeaseId;
    /// What the command is told about it.
    fn env(&self) -> Vec<(String, String)>;
    /// Gives it up.
    fn release(&self, client: &Client) -> impl Future<Output = Result<(), String>> + Send;
}

impl Claim for crate::lock::Guard {
    fn key(&self) -> &str {
        &self.key
    }

    fn created(&self) -> i64 {
        self.token
    }

    fn lease(&self) -> LeaseId {
        self.lease
    }

    fn env(&self) -> Vec<(String, String)> {
        let token = self.token.to_string();
        vec![
            ("COORD_LOCK_NAME".to_owned(), self.name.clone()),
            ("COORD_LOCK_KEY".to_owned(), self.key.clone()),
            ("COORD_LOCK_MODE".to_owned(), self.mode.to_string()),
            ("COORD_FENCING_TOKEN".to_owned(), token.clone()),
            ("ETCD_LOCK_KEY".to_owned(), self.key.clone()),
            ("ETCD_LOCK_REV".to_owned(), token),
        ]
    }

    async fn release(&self, client: &Client) -> Result<(), String> {
        crate::lock::Guard::release(self, client)
            .await
            .map_err(|e| e.to_string())
    }
}

impl Claim for crate::ids::Claim {
    fn key(&self) -> &str {
        &self.key
    }

    fn created(&self) -> i64 {
        self.generation
    }

    fn lease(&self) -> LeaseId {
        self.lease
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("COORD_INSTANCE_ID".to_owned(), self.id.to_string()),
            ("COORD_ID_POOL".to_owned(), self.pool.clone()),
            (
                "COORD_ID_GENERATION".to_owned(),
                self.generation.to_string(),
            ),
        ]
    }

    async fn release(&self, client: &Client) -> Result<(), String> {
        crate::ids::release(client, self)
            .await
            .map_err(|e| e.to_string())
    }
}

/// How a guarded run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The command exited by itself (code, or 128 + signal).
    Exited(i32),
    /// The claim was lost — the lease, or the key deleted by hand: the
    /// command was stopped.
    LockLost,
    /// Asked to stop (shutdown, a signal, the run's timeout): the command
    /// was stopped.
    Stopped,
}

/// How the claim ended.
#[derive(Debug)]
pub enum Held<C> {
    /// Released after the last run (`None`: nothing ran).
    Released { claim: C, last: Option<Ended> },
    /// Lost while the command ran: nothing left to release.
    Lost { claim: C },
}

/// Why nothing was held.
#[derive(Debug, thiserror::Error)]
pub enum HoldError<E> {
    #[error("cannot start the command's supervisor: {0}")]
    Supervisor(#[source] std::io::Error),
    #[error(transparent)]
    Claim(E),
}

/// The command to run under a claim.
#[derive(Debug, Clone, Copy)]
pub struct Guarded<'a> {
    pub client: &'a Client,
    /// The session whose lease the claim is taken on.
    pub session: &'a watch::Receiver<SessionState>,
    /// The coord binary (the supervisor is it, re-executed).
    pub coord: &'a Path,
    pub argv: &'a [String],
    /// Between TERM and KILL.
    pub grace: Duration,
}

/// A claim held for a command: taken with [`Holding::claim`], the command
/// run under it with [`Holding::run`] (a task runs once per claim), given
/// up with [`Holding::finish`].
#[derive(Debug)]
pub struct Holding<'a, C: Claim> {
    guarded: Guarded<'a>,
    claim: C,
    prepared: Option<Supervised>,
    last: Option<Ended>,
}

impl<'a, C: Claim> Holding<'a, C> {
    /// Starts the supervisor, then takes the claim with `claim` (the
    /// supervisor starts meanwhile, so taking it costs no process start).
    /// The claim future handles a stop on its own.
    pub async fn claim<E>(
        guarded: Guarded<'a>,
        claim: impl Future<Output = Result<C, E>>,
    ) -> Result<Holding<'a, C>, HoldError<E>> {
        let mut prepared = Some(
            Supervised::prepare(guarded.coord, guarded.argv, guarded.grace)
                .map_err(HoldError::Supervisor)?,
        );
        match claim.await {
            Ok(claim) => Ok(Holding {
                guarded,
                claim,
                prepared,
                last: None,
            }),
            Err(e) => {
                dismiss(prepared.take()).await;
                Err(HoldError::Claim(e))
            }
        }
    }

    /// What is held.
    pub fn held(&self) -> &C {
        &self.claim
    }

    /// Runs the command with `env` on top of the claim's, until it exits,
    /// the claim is lost, or `stop` completes; returns once nothing of it
    /// runs. After a loss it runs nothing and says so.
    pub async fn run(
        &mut self,
        env: Vec<(String, String)>,
        stop: impl Future<Output = ()>,
    ) -> Ended {
        if self.last == Some(Ended::LockLost) {
            return Ended::LockLost;
        }
        let g = self.guarded;
        let supervised = match self.prepared.take() {
            Some(p) => p,
            None => match Supervised::prepare(g.coord, g.argv, g.grace) {
                Ok(p) => p,
                Err(e) => {
                    warn!(key = %self.claim.key(), error = %e, "Cannot start the command's supervisor.");
                    return Ended::Exited(127);
                }
            },
        };
        let mut all = self.claim.env();
        all.extend(env);
        let ended = run_guarded(
            supervised,
            &self.claim,
            &all,
            g.client,
            g.session.clone(),
            stop,
        )
        .await;
        self.last = Some(ended);
        ended
    }

    /// Releases the claim — unless it was lost — once nothing of the
    /// command runs (which [`Holding::run`] has waited for).
    pub async fn finish(mut self) -> Held<C> {
        dismiss(self.prepared.take()).await;
        if self.last == Some(Ended::LockLost) {
            return Held::Lost { claim: self.claim };
        }
        release(self.guarded.client, self.guarded.session, &self.claim).await;
        Held::Released {
            claim: self.claim,
            last: self.last,
        }
    }
}

/// The whole of it for one run (`coord lock`, `coord ids claim`): claim,
/// run the command until it exits, the claim is lost or `stop` is
/// cancelled, release.
pub async fn hold_and_run<C: Claim, E>(
    guarded: Guarded<'_>,
    claim: impl Future<Output = Result<C, E>>,
    stop: &CancellationToken,
) -> Result<Held<C>, HoldError<E>> {
    let mut holding = Holding::claim(guarded, claim).await?;
    holding.run(Vec::new(), stop.cancelled()).await;
    Ok(holding.finish().await)
}

/// Stops a supervisor that never got to run its command.
async fn dismiss(prepared: Option<Supervised>) {
    if let Some(mut p) = prepared {
        p.stop().await;
        p.wait().await;
    }
}

/// Releases `claim`, retrying while its lease lives: a key left on a live
/// lease would outlast the run it belonged to.
async fn release<C: Claim>(client: &Client, session: &watch::Receiver<SessionState>, claim: &C) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match claim.release(client).await {
            Ok(()) => return,
            Err(e) => {
                if session.borrow().lease() != Some(claim.lease()) {
                    // The lease is gone (or going): the key goes with it.
                    return;
                }
                let wait = backoff.next_delay();
                warn!(key = %claim.key(), error = %e, retry_in = ?wait, "Could not release; retrying.");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Runs a prepared command while `claim` holds: hands it every renewed
/// deadline, stops it when the lease is lost, when the claim's key is
/// deleted, or when `stop` completes, and returns how it ended — once
/// nothing of the command runs.
pub async fn run_guarded<C: Claim>(
    mut supervised: Supervised,
    claim: &C,
    env: &[(String, String)],
    client: &Client,
    mut session: watch::Receiver<SessionState>,
    stop: impl Future<Output = ()>,
) -> Ended {
    let lease = claim.lease();
    let deadline = match *session.borrow_and_update() {
        SessionState::Alive { lease: l, deadline } if l == lease => Some(deadline),
        _ => None,
    };
    let Some(deadline) = deadline else {
        supervised.stop().await;
        supervised.wait().await;
        return Ended::LockLost;
    };
    supervised.go(deadline, env).await;
    // Watched once the command runs, off the handover's path.
    let gone = key_gone(client, claim.key(), claim.created());
    tokio::pin!(gone);
    tokio::pin!(stop);
    let mut ending: Option<Ended> = None;
    loop {
        tokio::select! {
            code = supervised.wait() => {
                return ending.unwrap_or(Ended::Exited(code));
            }
            changed = session.changed(), if ending.is_none() => {
                let now = if changed.is_ok() { *session.borrow_and_update() } else { SessionState::Closed };
                match now {
                    SessionState::Alive { lease: l, deadline } if l == lease => supervised.renew(deadline).await,
                    _ => {
                        ending = Some(Ended::LockLost);
                        supervised.stop().await;
                    }
                }
            }
            _ = &mut gone, if ending.is_none() => {
                warn!(key = %claim.key(), "The claim's key was deleted while its command ran; stopping the command.");
                ending = Some(Ended::LockLost);
                supervised.stop().await;
            }
            _ = &mut stop, if ending.is_none() => {
                ending = Some(Ended::Stopped);
                supervised.stop().await;
            }
        }
    }
}

/// Returns once `key` (created at `created`) is really gone; an etcd that
/// does not answer is not a deletion (the lease, watched separately,
/// decides then).
pub async fn key_gone(client: &Client, key: &str, created: i64) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    while client.wait_deleted(key, created, created).await.is_err() {
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
