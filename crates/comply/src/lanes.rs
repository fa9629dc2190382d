//! Lanes and priorities: the jobs of one upstream waiting for their turn.
//!
//! Jobs that touch the same limits under the same keys form a lane: one
//! FIFO queue per priority. Only a lane's head is ever asked of the engine,
//! so a lane waiting for its budget or its key's quota holds back only its
//! own jobs, never another lane's.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tollgate_core::{Item, Nanos};

/// How urgent a job or request is: high before normal before low, then oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    pub fn parse(text: &str) -> Result<Priority, String> {
        match text {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            other => Err(format!(
                "priority '{other}' is not known; use high, normal or low"
            )),
        }
    }

    pub fn rank(self) -> usize {
        self as usize
    }
}

/// One job in a scheduler: queued, backing off, or in flight.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) priority: Priority,
    pub(crate) attempts: u32,
    /// Attempts allowed (the upstream's `max_attempts`, or 1 for a request
    /// that is not safe to send twice).
    pub(crate) max_attempts: u32,
    /// Queued work (a job), not a live request: served after the live
    /// requests waiting, and only above the upstream's reserve.
    pub(crate) queued: bool,
    /// A queued job's workflow (its schedule applies).
    pub(crate) workflow: Option<CompactString>,
    pub(crate) items: Vec<Item>,
    /// The items the admitting decision charged (settled at completion),
    /// with what each had left just after: a window limit with more left at
    /// the reply has rolled over, and the reply's count is of the old window.
    pub(crate) committed: Vec<(Item, u64)>,
    pub(crate) lane: usize,
    /// Decided in process while the shared store was down (`fail =
    /// "local"`): settled in process too.
    pub(crate) local: bool,
    /// Order of sending: replies count only what reached the upstream
    /// before them, so requests sent after this one are not in its count.
    pub(crate) sent_order: u64,
    /// When its current attempt was sent.
    pub(crate) sent_at: Nanos,
}

#[derive(Debug, Default)]
struct Lane {
    /// One queue per priority, oldest (lowest seq) first.
    queues: [BTreeMap<u64, Entry>; 3],
}

impl Lane {
    fn head(&self) -> Option<&Entry> {
        self.queues.iter().find_map(|q| q.values().next())
    }
    fn pop(&mut self) -> Option<Entry> {
        self.queues
            .iter_mut()
            .find_map(|q| q.pop_first().map(|(_, e)| e))
    }
}

/// A lane's limits and keys, and whether it holds queued work and of which
/// workflow (inline: most calls have one or two limits, and looking a lane
/// up then allocates nothing). Live requests and queued jobs never share a
/// lane, nor do jobs of two workflows: a job held back by the reserve or
/// its workflow's schedule must not hold back the calls behind it.
type LaneKey = (
    bool,
    Option<CompactString>,
    SmallVec<[(usize, usize, CompactString); 2]>,
);

/// Every lane of one upstream, and which of them have a job queued.
#[derive(Debug, Default)]
pub(crate) struct Lanes {
    lanes: Vec<Lane>,
    lane_of: HashMap<LaneKey, usize>,
    /// Lanes with a job queued: the ones the scheduler asks.
    busy: BTreeSet<usize>,
    queued: usize,
}

impl Lanes {
    /// The lane of jobs touching exactly these limits and keys (live
    /// requests, or queued work of `workflow`).
    pub(crate) fn lane_for(
        &mut self,
        items: &[Item],
        queued: bool,
        workflow: Option<&CompactString>,
    ) -> usize {
        let key: LaneKey = (
            queued,
            workflow.filter(|_| queued).cloned(),
            items
                .iter()
                .map(|i| (i.limit, i.class, i.key.clone()))
                .collect(),
        );
        let next = self.lanes.len();
        let lane = *self.lane_of.entry(key).or_insert(next);
        if lane == next {
            self.lanes.push(Lane::default());
        }
        lane
    }

    pub(crate) fn enqueue(&mut self, entry: Entry) {
        self.queued += 1;
        self.busy.insert(entry.lane);
        self.lanes[entry.lane].queues[entry.priority.rank()].insert(entry.seq, entry);
    }

    /// Jobs queued (not backing off, not in flight).
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    pub(crate) fn head(&self, lane: usize) -> Option<&Entry> {
        self.lanes[lane].head()
    }

    /// The heads of the busy lanes, in the order they are served: live
    /// requests before queued work, then by priority, then age.
    pub(crate) fn heads_in_order(&self) -> SmallVec<[usize; 8]> {
        let mut heads: SmallVec<[(bool, Priority, u64, usize); 8]> = self
            .busy
            .iter()
            .filter_map(|&lane| {
                self.lanes[lane]
                    .head()
                    .map(|e| (e.queued, e.priority, e.seq, lane))
            })
            .collect();
        heads.sort_unstable();
        heads.into_iter().map(|(_, _, _, lane)| lane).collect()
    }

    pub(crate) fn pop(&mut self, lane: usize) -> Option<Entry> {
        let entry = self.lanes[lane].pop()?;
        self.queued -= 1;
        if self.lanes[lane].head().is_none() {
            self.busy.remove(&lane);
        }
        Some(entry)
    }

    /// Take a queued job out of its lane; None if it is not queued.
    pub(crate) fn remove(&mut self, seq: u64) -> Option<Entry> {
        let busy: Vec<usize> = self.busy.iter().copied().collect();
        for lane in busy {
            let found = self.lanes[lane]
                .queues
                .iter_mut()
                .find_map(|q| q.remove(&seq));
            if let Some(entry) = found {
                self.queued -= 1;
                if self.lanes[lane].head().is_none() {
                    self.busy.remove(&lane);
                }
                return Some(entry);
            }
        }
        None
    }
}
