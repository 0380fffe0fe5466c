//! One shutdown for every role: started once (a signal, a fatal error, a test), seen by every
//! long-lived task, in two steps. `begun`: stop taking new work, finish what is in flight.
//! `late`: the drain time is nearly over, so work still waiting answers with an explicit
//! error now rather than being cut off without one.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A process's shutdown; cheap to clone, every clone sees the same state.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    begun: CancellationToken,
    late: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the drain (again: no effect).
    pub fn begin(&self) {
        self.begun.cancel();
    }

    pub fn is_begun(&self) -> bool {
        self.begun.is_cancelled()
    }

    /// Resolves once the drain has begun. Owns what it needs, so a server can hold it.
    pub fn begun(&self) -> impl Future<Output = ()> + Send + use<> {
        self.begun.clone().cancelled_owned()
    }

    /// Marks the drain nearly over (and begun).
    pub fn give_up(&self) {
        self.begin();
        self.late.cancel();
    }

    /// Resolves once the drain is nearly over.
    pub fn late(&self) -> impl Future<Output = ()> + Send + use<> {
        self.late.clone().cancelled_owned()
    }

    /// Begins the drain when `signal` resolves, and gives up `drain` minus a margin for the
    /// last answers (up to 1 s, at most half of it) later. Returns at once.
    pub fn follow(&self, signal: impl Future<Output = ()> + Send + 'static, drain: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = signal => this.begin(),
                _ = this.begun() => {}
            }
            tokio::time::sleep(drain - (drain / 2).min(Duration::from_secs(1))).await;
            this.give_up();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_signal_begins_the_drain_and_gives_up_before_it_ends() {
        let s = Shutdown::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        s.follow(
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(10),
        );
        assert!(!s.is_begun());
        let clone = s.clone();
        tx.send(()).unwrap();
        clone.begun().await;
        assert!(s.is_begun());
        let t0 = tokio::time::Instant::now();
        s.late().await;
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(9),
            "1 s left for the last answers"
        );
    }

    #[tokio::test]
    async fn begin_is_idempotent_and_seen_by_every_clone() {
        let s = Shutdown::new();
        let waiters: Vec<_> = (0..3).map(|_| tokio::spawn(s.begun())).collect();
        s.begin();
        s.begin();
        for w in waiters {
            w.await.unwrap();
        }
    }
}
