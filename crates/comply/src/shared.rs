//! One upstream's scheduler for many callers at once (the proxy's requests,
//! each on its own task): a caller enters the line with its priority, limits
//! and attempt cap, waits for its turn (up to its deadline), sends, and
//! reports the response; the scheduler says whether it is done or when it
//! goes again. A driver task per upstream hands out the turns at the
//! instants the limits allow.
//!
//! A caller that goes away leaves the line: a queued ticket is forgotten,
//! and one in flight is settled (its concurrency slot comes back) without
//! counting as an answer.

use crate::lanes::Priority;
use crate::scheduler::{BySeq, Event, Next, Reply, Scheduler, Settled, Waiting};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tollgate_core::{Clock, Item, Nanos};
use tollgate_store::TokioClock;

/// What a caller asks for.
#[derive(Debug, Clone)]
pub struct Ask {
    pub priority: Priority,
    /// The limits the call touches (`Policy::plan`).
    pub items: Vec<Item>,
    /// At most this many attempts (1: not safe to send twice); capped by
    /// the upstream's `max_attempts`.
    pub max_attempts: u32,
    /// Queued work (a job), not a live request: served after the live
    /// requests waiting, and only above the upstream's reserve.
    pub queued: bool,
    /// Its workflow (a queued job's schedule applies).
    pub workflow: Option<String>,
}

/// Why a caller gets no turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Its deadline passed while it waited; what the line was waiting for.
    Expired { waiting: Option<Waiting> },
    /// It can never be sent (its cost exceeds a limit, or the policy
    /// rejects it).
    Rejected(String),
}

/// A turn handed to a caller.
#[derive(Debug)]
enum Turn {
    Send { attempt: u32 },
    Reject { reason: String },
}

#[derive(Debug)]
struct Line {
    core: Scheduler,
    /// The callers waiting for a turn, by seq.
    waiters: BySeq<oneshot::Sender<Turn>>,
}

impl Line {
    /// Hand out every turn the limits allow at `now`; the instant to look
    /// again, if the line waits for one.
    fn dispatch(&mut self, now: Nanos) -> Option<Nanos> {
        loop {
            match self.core.next(now) {
                Next::Send { seq, attempt } => {
                    let delivered = self
                        .waiters
                        .remove(&seq)
                        .is_some_and(|tx| tx.send(Turn::Send { attempt }).is_ok());
                    if !delivered {
                        // Its caller left just now: nothing was sent.
                        self.core.abandon(seq, now);
                    }
                }
                Next::Reject { seq, reason } => {
                    if let Some(tx) = self.waiters.remove(&seq) {
                        let _ = tx.send(Turn::Reject { reason });
                    }
                }
                Next::Wait(at) => return Some(at),
                Next::Blocked | Next::Idle => return None,
            }
        }
    }
}

struct Inner {
    name: String,
    line: Mutex<Line>,
    /// Wakes the driver (its own `Arc`: the driver waits on it without
    /// keeping the line alive).
    wake: Arc<Notify>,
    clock: TokioClock,
    seqs: AtomicU64,
    /// Its engine decides in a shared store (Redis): its round trips block.
    shared: bool,
    /// Told of every event (the proxy tells its fleet of a pause).
    on_event: std::sync::OnceLock<EventHook>,
}

type EventHook = Box<dyn Fn(&Event) + Send + Sync>;

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Run `f` on the line, then hand out every turn the limits allow now;
    /// the driver is woken when something must happen at a later instant.
    /// Turns go out here, on the caller's task, whenever they can: only
    /// timed wake-ups need the driver.
    fn step<R>(&self, f: impl FnOnce(&mut Line) -> R) -> R {
        let now = self.clock.now();
        let (result, wake, events) = self.with_line(|line| {
            let result = f(line);
            let wake = line.dispatch(now);
            (result, wake, line.core.drain_events())
        });
        self.log(&events, now);
        if wake.is_some() {
            self.wake.notify_one();
        }
        result
    }

    fn log(&self, events: &[Event], now: Nanos) {
        for event in events {
            tracing::info!("{}", event.describe(&self.name, now));
            if let Some(hook) = self.on_event.get() {
                hook(event);
            }
        }
    }

    /// Run `f` on the line. On a shared (Redis) engine the scheduler's
    /// round trips block, and so does waiting for the line while another
    /// caller's round trip holds it: both are done with the runtime told
    /// (where it can be), so its other tasks go on meanwhile.
    fn with_line<R>(&self, f: impl FnOnce(&mut Line) -> R) -> R {
        let multi = || {
            tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        };
        if self.shared && multi() {
            tokio::task::block_in_place(|| f(&mut self.line.lock()))
        } else {
            f(&mut self.line.lock())
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The driver wakes, finds the line gone, and ends.
        self.wake.notify_one();
    }
}

/// The handle many callers share; cloning it shares the line.
#[derive(Debug, Clone)]
pub struct SharedScheduler {
    inner: Arc<Inner>,
}

impl SharedScheduler {
    /// Start serving `core`'s line (on the current tokio runtime). The
    /// driver task ends when the last handle and ticket are gone.
    pub fn start(name: &str, core: Scheduler, clock: TokioClock) -> Self {
        let inner = Arc::new(Inner {
            name: name.to_string(),
            shared: core.engine().is_shared(),
            line: Mutex::new(Line {
                core,
                waiters: BySeq::default(),
            }),
            wake: Arc::new(Notify::new()),
            clock,
            seqs: AtomicU64::new(1),
            on_event: std::sync::OnceLock::new(),
        });
        tokio::spawn(drive(Arc::downgrade(&inner)));
        SharedScheduler { inner }
    }

    /// Enter the line. The ticket leaves it when dropped.
    pub fn enter(&self, ask: Ask) -> Ticket {
        let seq = self.inner.seqs.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.step(|line| {
            line.core.push_capped(
                seq,
                ask.priority,
                0,
                ask.max_attempts,
                ask.queued,
                ask.workflow.as_deref(),
                ask.items,
            );
            line.waiters.insert(seq, tx);
        });
        Ticket {
            inner: self.inner.clone(),
            seq,
            turn: Some(rx),
            sent_at: None,
        }
    }

    /// Have `hook` told of every event from now on (once per line).
    pub fn on_event(&self, hook: impl Fn(&Event) + Send + Sync + 'static) {
        let _ = self.inner.on_event.set(Box::new(hook));
    }

    /// Pause the whole line until `until` (another process of the fleet got
    /// a 429); false if it was already paused that long.
    pub fn pause(&self, until: Nanos) -> bool {
        self.inner.step(|line| line.core.pause(until))
    }

    /// A handle that does not keep the line alive.
    pub fn downgrade(&self) -> WeakScheduler {
        WeakScheduler(Arc::downgrade(&self.inner))
    }

    /// Look at the scheduler (counters, the engine's view of the quota).
    pub fn inspect<R>(&self, f: impl FnOnce(&Scheduler) -> R) -> R {
        self.inner.with_line(|line| f(&line.core))
    }

    /// The clock the line runs on.
    pub fn clock(&self) -> &TokioClock {
        &self.inner.clock
    }
}

/// A `SharedScheduler` that may be gone.
#[derive(Debug, Clone)]
pub struct WeakScheduler(Weak<Inner>);

impl WeakScheduler {
    pub fn upgrade(&self) -> Option<SharedScheduler> {
        self.0.upgrade().map(|inner| SharedScheduler { inner })
    }
}

/// A caller's place in the line, then its call in flight.
#[derive(Debug)]
pub struct Ticket {
    inner: Arc<Inner>,
    seq: u64,
    /// Waiting for a turn.
    turn: Option<oneshot::Receiver<Turn>>,
    /// In flight since.
    sent_at: Option<Nanos>,
}

impl Ticket {
    /// Wait for the turn to send (attempt number, from 1), or until
    /// `deadline` (then it leaves the line).
    pub async fn turn(&mut self, deadline: Option<Nanos>) -> Result<u32, Refused> {
        let until = deadline.map(|at| self.inner.clock.instant_at(at));
        let Some(rx) = self.turn.as_mut() else {
            return Err(Refused::Rejected(
                "this call has no turn to wait for".into(),
            ));
        };
        let expired = async move {
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        // The receiver stays in the ticket while it waits: a caller that
        // goes away mid-wait drops the ticket, which leaves the line.
        let woke = tokio::select! {
            // (the turn first: most are given at once, and then no timer is set)
            biased;
            turn = &mut *rx => Some(turn),
            () = expired => None,
        };
        let turn = match woke {
            Some(turn) => turn,
            None => {
                let seq = self.seq;
                let forgotten = self.inner.with_line(|line| {
                    let forgotten = line.core.forget(seq);
                    if forgotten {
                        line.waiters.remove(&seq);
                    }
                    forgotten.then(|| line.core.waiting())
                });
                if let Some(waiting) = forgotten {
                    self.turn = None;
                    self.inner.wake.notify_one();
                    return Err(Refused::Expired { waiting });
                }
                // Not queued any more: its turn was given just now.
                match self.turn.as_mut() {
                    Some(rx) => rx.await,
                    None => return Err(Refused::Rejected("no turn".into())),
                }
            }
        };
        self.turn = None;
        match turn {
            Ok(Turn::Send { attempt }) => {
                self.sent_at = Some(self.inner.clock.now());
                Ok(attempt)
            }
            Ok(Turn::Reject { reason }) => Err(Refused::Rejected(reason)),
            Err(_) => Err(Refused::Rejected("the upstream's line was closed".into())),
        }
    }

    /// The response to the call in flight: done, dead (the caller relays
    /// the last response), or a retry at an instant (wait for the next
    /// turn with `turn`).
    pub fn report(&mut self, reply: &Reply) -> Settled {
        let Some(sent_at) = self.sent_at.take() else {
            return Settled::Dead {
                reason: "no call of this ticket is in flight".into(),
            };
        };
        let now = self.inner.clock.now();
        let latency = Duration::from_nanos(now.saturating_sub(sent_at));
        let seq = self.seq;
        let (settled, turn) = self.inner.step(|line| {
            let settled = line.core.complete(seq, reply, latency, now);
            let turn = matches!(settled, Settled::Retry { .. }).then(|| {
                let (tx, rx) = oneshot::channel();
                line.waiters.insert(seq, tx);
                rx
            });
            (settled, turn)
        });
        self.turn = turn;
        settled
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let now = self.inner.clock.now();
        let seq = self.seq;
        let (turn, sent) = (self.turn.is_some(), self.sent_at.is_some());
        if !turn && !sent {
            return;
        }
        self.inner.step(|line| {
            if sent || !line.core.forget(seq) {
                // In flight, or handed its turn as it left: settle the call.
                line.core.abandon(seq, now);
            }
            line.waiters.remove(&seq);
        });
    }
}

/// Hand out turns when the limits allow, until the line is gone.
async fn drive(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let wake = strong.wake.clone();
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now = strong.clock.now();
        let (wake, events) =
            strong.with_line(|line| (line.dispatch(now), line.core.drain_events()));
        strong.log(&events, now);
        let sleep = wake.map(|at| strong.clock.instant_at(at));
        drop(strong);
        match sleep {
            Some(at) => {
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            None => notified.await,
        }
    }
}

impl Event {
    /// The log line for this event of upstream `name`.
    pub fn describe(&self, name: &str, now: Nanos) -> String {
        let secs = |at: Nanos| human(Duration::from_nanos(at.saturating_sub(now)));
        match self {
            Event::Paused { until, status } => {
                format!("{name}: HTTP {status}, pausing the upstream for {}", secs(*until))
            }
            Event::BreakerOpened { failures, until } => format!(
                "{name}: circuit breaker open after {failures} consecutive failures; probing again in {}",
                secs(*until)
            ),
            Event::BreakerHalfOpen => format!("{name}: circuit breaker half-open, sending one probe"),
            Event::BreakerClosed => format!("{name}: circuit breaker closed, the upstream answers again"),
            Event::StoreUnavailable { error } => format!(
                "{name}: the shared store cannot decide ({error}); limits with fail = \"closed\" hold every send until it answers"
            ),
            Event::StoreBack => format!("{name}: the shared store decides again"),
            Event::Slowed {
                rate,
                profile,
                keyed,
            } => format!(
                "{name}{}: HTTP 429 the local count did not predict: sending at {rate:.1}/s of the {profile:.1}/s the limits allow, rising again while calls succeed",
                one_key(*keyed)
            ),
            Event::Shared {
                others,
                left,
                keyed,
            } => format!(
                "{name}{}: the vendor's rate-limit headers count calls not sent from here (another client, about {others:.1}/s): sending at {left:.1}/s, what it leaves",
                one_key(*keyed)
            ),
            Event::Restored { profile, keyed } => format!(
                "{name}{}: calls succeed at the {profile:.1}/s the limits allow again; pacing by the limits alone",
                one_key(*keyed)
            ),
        }
    }
}

/// How a log line names a pace that is one vendor key's (never the key).
fn one_key(keyed: bool) -> &'static str {
    if keyed {
        " (one of its keys)"
    } else {
        ""
    }
}

/// `1h 02m 03s`, `4m 05s`, `6.7s`.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!(
            "{}h {:02}m {:02}s",
            secs / 3600,
            secs % 3600 / 60,
            secs % 60
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BreakerSettings;
    use tollgate_core::{NoProfiles, Policy};

    const SEC: Nanos = 1_000_000_000;
    const BUCKET: &str = "[[limit]]\nname = \"account\"\nalgorithm = \"token_bucket\"\ncapacity = 2\nrefill = \"1/s\"\n";

    fn line(limits: &str, concurrency: usize) -> SharedScheduler {
        let policy: Policy = tollgate_core::parse(limits, &NoProfiles).unwrap();
        let engine = tollgate_store::Engine::new(policy);
        let core = Scheduler::new(engine, 3, concurrency, BreakerSettings::default(), 1);
        SharedScheduler::start("vendor", core, TokioClock::starting_at(0))
    }

    fn ask(line: &SharedScheduler, priority: Priority) -> Ask {
        let mut items = Vec::new();
        let req = tollgate_core::Attrs::new("GET", "/x", &[]);
        line.inspect(|s| s.engine().policy().plan(&req, &mut items))
            .unwrap();
        Ask {
            priority,
            items,
            max_attempts: 3,
            queued: false,
            workflow: None,
        }
    }

    fn ok() -> Reply {
        Reply::Status {
            status: 200,
            retry_after: None,
            corrections: Vec::new(),
        }
    }

    /// Callers that enter now, in order; each reports 200 at its turn.
    /// Returns (caller, instant of its turn) in the order turns came.
    async fn run_callers(line: &SharedScheduler, priorities: &[Priority]) -> Vec<(usize, Nanos)> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, &p) in priorities.iter().enumerate() {
            let mut ticket = line.enter(ask(line, p));
            let (tx, clock) = (tx.clone(), line.clock().clone());
            tokio::spawn(async move {
                ticket.turn(None).await.unwrap();
                tx.send((i, clock.now())).unwrap();
                assert_eq!(ticket.report(&ok()), Settled::Done);
            });
        }
        drop(tx);
        let mut turns = Vec::new();
        while let Some(t) = rx.recv().await {
            turns.push(t);
        }
        turns
    }

    #[tokio::test(start_paused = true)]
    async fn callers_wait_in_line_for_the_instant_the_limit_admits_them() {
        let line = line(BUCKET, 10);
        let turns = run_callers(&line, &[Priority::Normal; 5]).await;
        assert_eq!(
            turns,
            vec![(0, 0), (1, 0), (2, SEC), (3, 2 * SEC), (4, 3 * SEC)],
            "FIFO, each at its token's instant"
        );
        assert_eq!(line.inspect(|s| s.counters().done), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_high_priority_caller_takes_the_next_slot_before_queued_low_ones() {
        let line = line(BUCKET, 10);
        let lows = {
            let line = line.clone();
            tokio::spawn(async move { run_callers(&line, &[Priority::Low; 6]).await })
        };
        // The lows have the burst and queue for the rest; then high comes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut high = line.enter(ask(&line, Priority::High));
        assert_eq!(high.turn(None).await, Ok(1));
        assert_eq!(line.clock().now(), SEC, "the next slot");
        assert_eq!(high.report(&ok()), Settled::Done);
        let lows = lows.await.unwrap();
        let at: Vec<Nanos> = lows.iter().map(|(_, at)| *at).collect();
        assert_eq!(at, vec![0, 0, 2 * SEC, 3 * SEC, 4 * SEC, 5 * SEC]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_that_passes_leaves_the_line_and_spends_nothing() {
        let line = line(BUCKET, 10);
        run_callers(&line, &[Priority::Normal; 2]).await; // the burst is spent
        let mut late = line.enter(ask(&line, Priority::Normal));
        let refused = late.turn(Some(SEC / 2)).await.unwrap_err();
        assert_eq!(
            refused,
            Refused::Expired {
                waiting: Some(Waiting {
                    until: SEC,
                    limit: Some(0)
                })
            }
        );
        assert_eq!(line.clock().now(), SEC / 2);
        assert_eq!(line.inspect(|s| s.queued()), 0);
        drop(late);
        // Its token is still there for the next caller, at 1 s.
        let turns = run_callers(&line, &[Priority::Normal]).await;
        assert_eq!(turns, vec![(0, SEC)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_leaves_gives_its_place_and_its_slot_back() {
        let line = line(
            "[[limit]]\nname = \"in-flight\"\nalgorithm = \"concurrency\"\nmax = 1\n",
            10,
        );
        let mut first = line.enter(ask(&line, Priority::Normal));
        assert_eq!(first.turn(None).await, Ok(1));
        // Queued behind the one in flight, then gone.
        let queued = line.enter(ask(&line, Priority::Normal));
        tokio::task::yield_now().await;
        drop(queued);
        assert_eq!(line.inspect(|s| s.queued()), 0);
        // The one in flight leaves without a response: its slot comes back.
        drop(first);
        let mut next = line.enter(ask(&line, Priority::Normal));
        let turned = tokio::time::timeout(std::time::Duration::from_secs(1), next.turn(None)).await;
        assert_eq!(turned, Ok(Ok(1)));
        assert_eq!(line.inspect(|s| (s.counters().done, s.in_flight())), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_sends_the_caller_back_in_line_and_pauses_everyone() {
        let line = line(&BUCKET.replace("capacity = 2", "capacity = 10"), 10);
        let mut a = line.enter(ask(&line, Priority::Normal));
        assert_eq!(a.turn(None).await, Ok(1));
        let throttled = Reply::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(2)),
            corrections: Vec::new(),
        };
        let Settled::Retry { at } = a.report(&throttled) else {
            panic!("expected a retry");
        };
        assert!((2 * SEC..=2 * SEC + SEC / 4).contains(&at), "{at}");
        // Another caller, with tokens left, waits out the pause too, and
        // then one interval of the pace the 429 set (a lone one: 0.95 of
        // the 1/s it came at): the older call goes first when the pause ends.
        let mut b = line.enter(ask(&line, Priority::Normal));
        assert_eq!(b.turn(None).await, Ok(1));
        // (tokio's timers fire on whole milliseconds: the pause's end and
        // the interval after it are each rounded up)
        let now = line.clock().now();
        let paced = at + 1_052_631_578;
        assert!((paced..paced + 2_000_000).contains(&now), "{now} {at}");
        assert_eq!(a.turn(None).await, Ok(2));
        assert_eq!(a.report(&ok()), Settled::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_is_not_safe_to_repeat_gets_one_attempt() {
        let line = line(&BUCKET.replace("capacity = 2", "capacity = 10"), 10);
        let mut ask = ask(&line, Priority::Normal);
        ask.max_attempts = 1;
        let mut t = line.enter(ask);
        assert_eq!(t.turn(None).await, Ok(1));
        let failed = Reply::Failed {
            error: "connection reset".into(),
        };
        assert!(matches!(t.report(&failed), Settled::Dead { .. }));
    }
}
