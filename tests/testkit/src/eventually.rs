//! Waiting for a condition instead of sleeping a fixed time: a fixed sleep is either too short on a
//! loaded machine (a flaky test) or longer than needed everywhere else (a slow suite).
//!
//! ```ignore
//! let job = eventually("the job to be claimed", Duration::from_secs(10), || async {
//!     store.job(&id).await.ok().flatten().filter(|job| job.claimed())
//! })
//! .await;
//! ```

use std::future::Future;
use std::time::Duration;

/// How often the condition is tried again: short enough to add little to a test, long enough not
/// to busy-loop a two-core machine.
const INTERVAL: Duration = Duration::from_millis(25);

/// What a condition's attempt gives back: a value once it holds, nothing (or an error, kept for
/// the panic message) while it does not yet.
pub trait Outcome {
    type Value;
    /// The value, or why not yet.
    fn into_result(self) -> Result<Self::Value, String>;
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn into_result(self) -> Result<T, String> {
        self.ok_or_else(|| "None".to_owned())
    }
}

impl<T, E: std::fmt::Debug> Outcome for Result<T, E> {
    type Value = T;
    fn into_result(self) -> Result<T, String> {
        self.map_err(|e| format!("{e:?}"))
    }
}

/// Tries `attempt` every few milliseconds until it returns `Some`/`Ok`, and returns that value;
/// panics, naming `what` and the last answer, if `timeout` passes first.
pub async fn eventually<F, Fut, O>(what: &str, timeout: Duration, mut attempt: F) -> O::Value
where
    F: FnMut() -> Fut,
    Fut: Future<Output = O>,
    O: Outcome,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match attempt().await.into_result() {
            Ok(value) => return value,
            Err(last) => last,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("waited {timeout:?} for {what}; the last attempt gave {last}");
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn returns_the_first_value_that_holds() {
        let tries = AtomicUsize::new(0);
        let got = eventually("the third try", Duration::from_secs(5), || async {
            let n = tries.fetch_add(1, Ordering::SeqCst) + 1;
            (n >= 3).then_some(n)
        })
        .await;
        assert_eq!(got, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waited 100ms for the impossible; the last attempt gave \"no\"")]
    async fn panics_naming_what_it_waited_for() {
        eventually("the impossible", Duration::from_millis(100), || async {
            Err::<(), _>("no")
        })
        .await;
    }
}
