//! Lanes and priorities: the jobs of one upstream waiting for their turn.
//!
//! Jobs that touch the same limits under the same keys form a lane: one
//! FIFO queue per priority. Only a lane's head is ever asked of the engine,
//! so a lane waiting for its budget or its key's quota holds back only its
//! own jobs, never another lane's.

use compact_str::CompactString;
use hashbrown::HashTable;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hash, Hasher};
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
/// workflow (inline: most calls have one or two limits). Live requests and
/// queued jobs never share a lane, nor do jobs of two workflows: a job held
/// back by the reserve or its workflow's schedule must not hold back the
/// calls behind it.
#[derive(Debug)]
struct LaneKey {
    queued: bool,
    workflow: Option<CompactString>,
    items: SmallVec<[(usize, usize, CompactString); 2]>,
    lane: usize,
}

impl LaneKey {
    fn is(&self, queued: bool, workflow: Option<&str>, items: &[Item]) -> bool {
        self.queued == queued
            && self.workflow.as_deref() == workflow
            && self.items.len() == items.len()
            && (self.items.iter().zip(items)).all(|((limit, class, key), i)| {
                *limit == i.limit && *class == i.class && *key == i.key
            })
    }
}

fn lane_hash<'a>(
    hasher: &foldhash::fast::RandomState,
    queued: bool,
    workflow: Option<&str>,
    items: impl Iterator<Item = (usize, usize, &'a str)>,
) -> u64 {
    let mut h = hasher.build_hasher();
    (queued, workflow).hash(&mut h);
    for item in items {
        item.hash(&mut h);
    }
    h.finish()
}

/// Every lane of one upstream, and which of them have a job queued.
#[derive(Debug, Default)]
pub(crate) struct Lanes {
    lanes: Vec<Lane>,
    /// Looked up by the request's own items, so finding a lane copies
    /// nothing (this runs for every call).
    lane_of: HashTable<LaneKey>,
    hasher: foldhash::fast::RandomState,
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
        let workflow = workflow.filter(|_| queued).map(CompactString::as_str);
        let parts = items.iter().map(|i| (i.limit, i.class, i.key.as_str()));
        let hash = lane_hash(&self.hasher, queued, workflow, parts);
        if let Some(found) = self.lane_of.find(hash, |k| k.is(queued, workflow, items)) {
            return found.lane;
        }
        let lane = self.lanes.len();
        self.lanes.push(Lane::default());
        let key = LaneKey {
            queued,
            workflow: workflow.map(CompactString::from),
            items: (items.iter())
                .map(|i| (i.limit, i.class, i.key.clone()))
                .collect(),
            lane,
        };
        let hasher = &self.hasher;
        self.lane_of.insert_unique(hash, key, |k| {
            let parts = k.items.iter().map(|(l, c, key)| (*l, *c, key.as_str()));
            lane_hash(hasher, k.queued, k.workflow.as_deref(), parts)
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn item(limit: usize, class: usize, key: &str) -> Item {
        Item {
            limit,
            class,
            key: key.into(),
            cost: 1,
            charge: 1,
        }
    }

    #[test]
    fn a_lane_is_one_set_of_limits_and_keys_live_or_of_one_workflow() {
        let mut lanes = Lanes::default();
        let two = [item(0, 0, "tenant-1"), item(1, 0, "tenant-1")];
        let nightly = CompactString::from("nightly");
        let hourly = CompactString::from("hourly");
        let live = lanes.lane_for(&two, false, None);
        // The same limits and keys find the same lane, without a new one.
        assert_eq!(lanes.lane_for(&two, false, None), live);
        // A workflow names a lane only for queued work.
        assert_eq!(lanes.lane_for(&two, false, Some(&nightly)), live);
        let others = [
            lanes.lane_for(&two, true, None),
            lanes.lane_for(&two, true, Some(&nightly)),
            lanes.lane_for(&two, true, Some(&hourly)),
            lanes.lane_for(&[item(0, 0, "tenant-1")], false, None),
            lanes.lane_for(
                &[item(0, 0, "tenant-2"), item(1, 0, "tenant-1")],
                false,
                None,
            ),
            lanes.lane_for(
                &[item(0, 1, "tenant-1"), item(1, 0, "tenant-1")],
                false,
                None,
            ),
            lanes.lane_for(
                &[item(1, 0, "tenant-1"), item(0, 0, "tenant-1")],
                false,
                None,
            ),
            lanes.lane_for(&[], false, None),
        ];
        let mut all = vec![live];
        all.extend(others);
        let mut distinct = all.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), all.len(), "lanes: {all:?}");
        assert_eq!(lanes.lanes.len(), all.len());
        // Each is found again, many lanes later.
        assert_eq!(lanes.lane_for(&two, true, Some(&hourly)), others[2]);
        assert_eq!(lanes.lane_for(&[], false, None), others[7]);
        assert_eq!(lanes.lanes.len(), all.len());
    }
}
