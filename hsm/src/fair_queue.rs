//! The session pool's job queue: one FIFO lane per tenant (svsd: per
//! application entity), the lanes served in turn, bounded in total.
//!
//! Written here rather than taken from a crate: the pool needs a bounded
//! multi-consumer queue whose workers block with a timeout (to probe idle
//! sessions), and crossbeam's channel, which it used before, has one order
//! only. With one FIFO a tenant with many requests in flight (each within
//! its own concurrency cap) put every other tenant's signature behind all
//! of them: with a slow HSM, past the operation timeout. Served in turn, a
//! job waits for at most one job of each other busy lane per worker.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Rounds of busy-waiting (1, 2, 4 … 64 spin hints) before a worker waits
/// for a job by yielding, and rounds of yielding before it sleeps:
/// crossbeam's backoff.
const SPIN_STEPS: u32 = 7;
const YIELD_STEPS: u32 = 4;

/// Emptied lanes kept with their deque, so that a lane that comes and goes
/// does not allocate each time. Past this many lanes, an emptied one is
/// dropped: svsd gives every entity a lane of its own, and entities
/// removed or renamed by reloads would otherwise keep theirs for good.
const IDLE_LANES_KEPT: usize = 64;
/// Slots an emptied lane keeps; a burst that grew it further gives the rest
/// back.
const IDLE_LANE_SLOTS: usize = 64;

/// Whose job it is, for taking turns. Numbers are the caller's; jobs of
/// one lane keep their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Lane(pub u64);

impl Lane {
    /// Work no tenant asked for (self-tests, key discovery, the audit
    /// anchor), and callers that do not tell tenants apart.
    pub const SHARED: Lane = Lane(0);
}

/// Why a job was not queued; the job is handed back.
#[derive(Debug)]
pub(crate) enum PushError<T> {
    /// The queue holds its capacity.
    Full(T),
    /// The queue was closed (the pool is shutting down).
    Closed(T),
}

/// Why no job was taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PopError {
    /// None came within the timeout.
    Timeout,
    /// Closed and empty: the worker can stop.
    Closed,
}

struct State<T> {
    /// Lanes with jobs, and up to [`IDLE_LANES_KEPT`] emptied ones.
    lanes: HashMap<Lane, VecDeque<T>>,
    /// The lanes with jobs, in the order they are served next.
    turn: VecDeque<Lane>,
    closed: bool,
    /// Workers blocked on the condition variable: a push wakes one only
    /// when there is one (std's notify is a system call either way).
    sleepers: usize,
}

/// A bounded queue of lanes served round-robin.
pub(crate) struct FairQueue<T> {
    state: Mutex<State<T>>,
    available: Condvar,
    capacity: usize,
    /// Jobs queued, readable without the lock (metrics, health).
    len: AtomicUsize,
}

impl<T> FairQueue<T> {
    /// An empty queue for at most `capacity` jobs.
    pub(crate) fn new(capacity: usize) -> FairQueue<T> {
        FairQueue {
            state: Mutex::new(State {
                lanes: HashMap::new(),
                turn: VecDeque::new(),
                closed: false,
                sleepers: 0,
            }),
            available: Condvar::new(),
            capacity,
            len: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Jobs queued now.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Queues `item` at the end of `lane`.
    pub(crate) fn push(&self, lane: Lane, item: T) -> Result<(), PushError<T>> {
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed(item));
        }
        if self.len.load(Ordering::Relaxed) >= self.capacity {
            return Err(PushError::Full(item));
        }
        let queue = s.lanes.entry(lane).or_default();
        let was_empty = queue.is_empty();
        queue.push_back(item);
        if was_empty {
            s.turn.push_back(lane);
        }
        self.len.fetch_add(1, Ordering::Relaxed);
        let wake = s.sleepers > 0;
        drop(s);
        if wake {
            self.available.notify_one();
        }
        Ok(())
    }

    /// The next job in turn, if any.
    fn take(&self, s: &mut State<T>) -> Option<T> {
        let lane = s.turn.pop_front()?;
        let queue = s.lanes.get_mut(&lane)?;
        let item = queue.pop_front()?;
        let emptied = queue.is_empty();
        if emptied {
            queue.shrink_to(IDLE_LANE_SLOTS);
        }
        if !emptied {
            s.turn.push_back(lane);
        } else if s.lanes.len() > IDLE_LANES_KEPT {
            s.lanes.remove(&lane);
        }
        self.len.fetch_sub(1, Ordering::Relaxed);
        Some(item)
    }

    /// The next job in turn, without waiting.
    pub(crate) fn try_pop(&self) -> Option<T> {
        let mut s = self.lock();
        self.take(&mut s)
    }

    /// The next job in turn, waiting up to `timeout` for one. A closed
    /// queue still hands out what it holds.
    pub(crate) fn pop_timeout(&self, timeout: Duration) -> Result<T, PopError> {
        // Spin, then yield, a little before sleeping, as crossbeam's channel
        // did: under load the next job comes within microseconds, and a
        // futex sleep and wake-up (a VM exit each under a hypervisor) cost
        // more than that. Without it svsd's single-request throughput fell
        // 7% against the channel.
        for step in 0..SPIN_STEPS + YIELD_STEPS {
            if self.len() > 0
                && let Some(item) = self.try_pop()
            {
                return Ok(item);
            }
            if step < SPIN_STEPS {
                for _ in 0..1u32 << step {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
        }
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if let Some(item) = self.take(&mut s) {
                return Ok(item);
            }
            if s.closed {
                return Err(PopError::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PopError::Timeout);
            }
            s.sleepers += 1;
            s = self
                .available
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            s.sleepers -= 1;
        }
    }

    /// Refuses new jobs; waiting workers wake, take what is left, then stop.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.available.notify_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lanes_of_tenants_gone_do_not_stay() {
        let q = FairQueue::new(64);
        for lane in 1..=10_000 {
            for i in 0..64 {
                q.push(Lane(lane), i).unwrap();
            }
            while q.try_pop().is_some() {}
        }
        let s = q.lock();
        assert!(s.lanes.len() <= IDLE_LANES_KEPT, "{}", s.lanes.len());
        let slots: usize = s.lanes.values().map(VecDeque::capacity).sum();
        assert!(slots <= IDLE_LANES_KEPT * IDLE_LANE_SLOTS, "{slots}");
    }

    #[test]
    fn lanes_take_turns_and_each_keeps_its_order() {
        let q = FairQueue::new(100);
        for i in 0..5 {
            q.push(Lane(1), (1, i)).unwrap();
        }
        q.push(Lane(2), (2, 0)).unwrap();
        q.push(Lane(2), (2, 1)).unwrap();
        q.push(Lane::SHARED, (0, 0)).unwrap();
        assert_eq!(q.len(), 8);
        let order: Vec<_> = std::iter::from_fn(|| q.try_pop()).collect();
        assert_eq!(
            order,
            [
                (1, 0),
                (2, 0),
                (0, 0),
                (1, 1),
                (2, 1),
                (1, 2),
                (1, 3),
                (1, 4)
            ]
        );
        assert_eq!(q.len(), 0);
        // A lane that empties and comes back joins at the end of the turn.
        q.push(Lane(1), (1, 5)).unwrap();
        q.push(Lane(2), (2, 2)).unwrap();
        q.push(Lane(1), (1, 6)).unwrap();
        let order: Vec<_> = std::iter::from_fn(|| q.try_pop()).collect();
        assert_eq!(order, [(1, 5), (2, 2), (1, 6)]);
    }

    #[test]
    fn the_bound_is_on_all_lanes_together_and_a_full_queue_hands_the_job_back() {
        let q = FairQueue::new(3);
        q.push(Lane(1), 1).unwrap();
        q.push(Lane(2), 2).unwrap();
        q.push(Lane(3), 3).unwrap();
        assert!(matches!(q.push(Lane(4), 4), Err(PushError::Full(4))));
        assert_eq!(q.try_pop(), Some(1));
        q.push(Lane(4), 4).unwrap();
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn a_waiting_worker_wakes_for_a_job_times_out_without_one_and_drains_before_closing() {
        let q = std::sync::Arc::new(FairQueue::new(4));
        let started = Instant::now();
        assert_eq!(
            q.pop_timeout(Duration::from_millis(30)),
            Err(PopError::Timeout)
        );
        assert!(started.elapsed() >= Duration::from_millis(30));

        let waiter = {
            let q = q.clone();
            std::thread::spawn(move || q.pop_timeout(Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(20));
        q.push(Lane(7), 7).unwrap();
        assert_eq!(waiter.join().unwrap(), Ok(7));

        q.push(Lane(1), 1).unwrap();
        q.close();
        assert!(matches!(q.push(Lane(1), 2), Err(PushError::Closed(2))));
        assert_eq!(q.pop_timeout(Duration::from_secs(30)), Ok(1));
        assert_eq!(
            q.pop_timeout(Duration::from_secs(30)),
            Err(PopError::Closed)
        );

        // Workers blocked on an empty queue wake when it closes.
        let q = std::sync::Arc::new(FairQueue::<u8>::new(4));
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let q = q.clone();
                std::thread::spawn(move || q.pop_timeout(Duration::from_secs(30)))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        q.close();
        for w in waiters {
            assert_eq!(w.join().unwrap(), Err(PopError::Closed));
        }
    }
}
