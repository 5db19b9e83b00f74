//! Reading request bodies within a memory budget: the bodies of all triggers being received,
//! waiting for their turn or being worked on hold at most `--max-body-memory` bytes at once.
//!
//! A trigger's body is read whole into memory before it is parsed, and kept until it is stored.
//! Each body was bounded (`--max-body`) but their number was not: 24 concurrent 62 MB triggers
//! took the daemon to 2.25 GB. So every byte of buffer takes a share of the budget before it is
//! allocated:
//!
//! - with a `Content-Length`, the whole length is taken before a byte is read; a body that does
//!   not fit now is refused (the caller sends 503 with `Retry-After`) and none of it is kept;
//! - without one (chunked), the buffer grows by doubling, and each growth is taken first; a body
//!   that runs out of budget half-way is refused then, and what it had is let go.
//!
//! A refused body is still read to its end (each piece dropped as it comes), unless the client
//! asked for `100 Continue` first: a client still sending when the answer comes and the
//! connection closes reports a broken pipe, not the 503 it could have retried after.
//!
//! The share is given back when the trigger is stored or refused ([`Held`] is dropped with the
//! body). Parsing and storing a trigger take memory beyond its body, about as much again for as
//! long as it is worked on, so the daemon's memory for triggers stays under about 2.5 times the
//! budget. Measured (2026-12-03, 2 cores): 24 concurrent triggers of 66 MB with the defaults
//! (`--max-body` 64 MiB, budget 128 MiB) took the daemon from 34 MiB idle to a 333 MiB peak, 2
//! stored and 22 told to come back; without the budget, 1851 MiB.

use std::sync::Arc;

use axum::body::{Body, HttpBody};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The bytes of request bodies the daemon holds at once.
#[derive(Clone, Debug)]
pub struct Budget {
    bytes: Arc<Semaphore>,
    total: usize,
}

/// A share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Held(OwnedSemaphorePermit);

impl Held {
    /// How many bytes it holds.
    pub fn bytes(&self) -> usize {
        self.0.num_permits()
    }
}

/// Why a body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Larger than the largest body accepted.
    #[error(
        "the request body is larger than {max} bytes: split the audience over several triggers, or start the daemon with a larger --max-body"
    )]
    TooLarge {
        /// `--max-body`.
        max: usize,
    },
    /// The budget has no room for it now.
    #[error(
        "the daemon holds as many request bodies as it takes at once ({total} bytes, --max-body-memory): send the trigger again after Retry-After, or in smaller parts"
    )]
    Busy {
        /// `--max-body-memory`.
        total: usize,
    },
    /// The connection failed or the body is not valid HTTP.
    #[error("cannot read the request body: {0}")]
    Read(String),
}

impl Budget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        let total = total.min(Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The budget in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held by bodies now.
    pub fn in_use(&self) -> usize {
        self.total - self.bytes.available_permits()
    }

    /// Takes `n` bytes, now or not at all.
    fn take(&self, n: usize) -> Result<Held, BodyError> {
        let busy = || BodyError::Busy { total: self.total };
        let mut held = self
            .bytes
            .clone()
            .try_acquire_many_owned(0)
            .map_err(|_| busy())?;
        let mut left = n;
        // A semaphore gives at most u32::MAX permits at a time.
        while left > 0 {
            let piece = u32::try_from(left).unwrap_or(u32::MAX);
            let more = self
                .bytes
                .clone()
                .try_acquire_many_owned(piece)
                .map_err(|_| busy())?;
            held.merge(more);
            left -= piece as usize;
        }
        Ok(Held(held))
    }

    /// Reads `body`, of at most `max` bytes, into one buffer, holding a share of the budget for
    /// every byte of it. A body refused for want of budget is read to its end and dropped as it
    /// comes, unless the client waits for `100 Continue` before sending it.
    pub async fn read(
        &self,
        mut body: Body,
        max: usize,
        expects_continue: bool,
    ) -> Result<(Vec<u8>, Held), BodyError> {
        match self.fill(&mut body, max).await {
            Err(busy @ BodyError::Busy { .. }) => {
                if !expects_continue {
                    discard(body, max).await;
                }
                Err(busy)
            }
            other => other,
        }
    }

    async fn fill(&self, body: &mut Body, max: usize) -> Result<(Vec<u8>, Held), BodyError> {
        let too_large = || BodyError::TooLarge { max };
        let (mut buffer, mut held) = match body.size_hint().exact() {
            Some(length) => {
                let length = usize::try_from(length).map_err(|_| too_large())?;
                if length > max {
                    return Err(too_large());
                }
                (Vec::with_capacity(length), self.take(length)?)
            }
            None => (Vec::new(), self.take(0)?),
        };
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let needed = buffer.len().saturating_add(data.len());
            if needed > max {
                return Err(too_large());
            }
            if needed > held.bytes() {
                let grown = needed.max(held.bytes().saturating_mul(2)).min(max);
                held.0.merge(self.take(grown - held.bytes())?.0);
                buffer.reserve_exact(grown - buffer.len());
            }
            buffer.extend_from_slice(&data);
        }
        Ok((buffer, held))
    }
}

/// Reads the rest of `body`, up to `max` bytes, keeping none of it.
async fn discard(mut body: Body, max: usize) {
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            seen = seen.saturating_add(data.len());
            if seen > max {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn chunked(parts: Vec<Vec<u8>>) -> Body {
        let stream = futures_util::stream::iter(
            parts
                .into_iter()
                .map(|p| Ok::<_, std::io::Error>(axum::body::Bytes::from(p))),
        );
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn a_body_holds_its_length_until_it_is_dropped() {
        let budget = Budget::new(100);
        let (bytes, held) = budget
            .read(Body::from(vec![7u8; 60]), 80, false)
            .await
            .unwrap();
        assert_eq!((bytes.len(), held.bytes(), budget.in_use()), (60, 60, 60));
        let second = budget.read(Body::from(vec![7u8; 60]), 80, false).await;
        assert!(matches!(second, Err(BodyError::Busy { total: 100 })));
        drop((bytes, held));
        assert_eq!(budget.in_use(), 0);
        assert!(
            budget
                .read(Body::from(vec![7u8; 60]), 80, false)
                .await
                .is_ok()
        );
    }

    #[test]
    fn a_refused_body_is_read_to_its_end_unless_the_client_waits_to_send_it() {
        use futures_util::FutureExt;
        let budget = Budget::new(10);
        // 20 bytes, then a client that sends nothing more for now.
        let unfinished = || {
            let first = futures_util::stream::iter([Ok::<_, std::io::Error>(
                axum::body::Bytes::from(vec![0u8; 20]),
            )]);
            Body::from_stream(first.chain(futures_util::stream::pending()))
        };
        let refused = budget.read(unfinished(), 100, true).now_or_never();
        assert!(
            matches!(refused, Some(Err(BodyError::Busy { total: 10 }))),
            "{refused:?}"
        );
        let draining = budget.read(unfinished(), 100, false).now_or_never();
        assert!(
            draining.is_none(),
            "the answer waits for the rest of the body"
        );
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_before_it_is_read() {
        let budget = Budget::new(1000);
        let err = budget
            .read(Body::from(vec![0u8; 81]), 80, false)
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::TooLarge { max: 80 }), "{err}");
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_chunked_body_takes_its_budget_as_it_grows() {
        let budget = Budget::new(500);
        let parts = vec![vec![1u8; 10], vec![2u8; 30], vec![3u8; 5]];
        let (bytes, held) = budget.read(chunked(parts), 500, false).await.unwrap();
        assert_eq!(bytes.len(), 45);
        assert!(bytes[..10].iter().all(|&b| b == 1) && bytes[40..].iter().all(|&b| b == 3));
        assert!(held.bytes() >= 45 && held.bytes() <= 90, "{}", held.bytes());
        assert!(
            bytes.capacity() <= held.bytes() + 16,
            "{}",
            bytes.capacity()
        );
        let err = budget
            .read(chunked(vec![vec![0u8; 300], vec![0u8; 300]]), 700, false)
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::Busy { .. }), "{err}");
        assert_eq!(
            budget.in_use(),
            held.bytes(),
            "a refused body lets go of what it had"
        );
        drop(held);
        let err = budget
            .read(chunked(vec![vec![0u8; 300], vec![0u8; 300]]), 400, false)
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::TooLarge { max: 400 }), "{err}");
        assert_eq!(budget.in_use(), 0);
    }
}
