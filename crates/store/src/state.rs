//! One state value per tracked key, whatever its algorithm, in 16 bytes: a
//! bucket's TAT inline (its fraction of a nanosecond in 32 bits, which every
//! rate of up to 4,294,967,295 units a period needs), every larger state
//! behind one thin pointer (see `MemoryStore` for what a key costs).

use tollgate_core::algo::concurrency::{Concurrency, ConcurrencyState};
use tollgate_core::algo::fixed_window::{FixedWindow, FixedWindowState};
use tollgate_core::algo::gcra::{self, Gcra, GcraState};
use tollgate_core::algo::sliding_window::{SlidingWindow, SlidingWindowState};
use tollgate_core::algo::tiered::{self, Tiered, TieredState};
use tollgate_core::algo::{Earliest, Meter, Usage};
use tollgate_core::policy::Params;
use tollgate_core::Nanos;

/// One key's state, whichever algorithm its limit runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyState {
    /// Token or leaky bucket: the theoretical arrival time, `ns + frac /
    /// amount` (fields of the variant, not a struct, so the tag shares their
    /// first word).
    Gcra {
        /// Whole nanoseconds.
        ns: Nanos,
        /// The fraction of a nanosecond, in the rate's `amount`ths.
        frac: u32,
    },
    /// A bucket whose rate's `amount` does not fit 32 bits.
    WideGcra(Box<GcraState>),
    /// The current window's start and count.
    FixedWindow(Box<FixedWindowState>),
    /// The sub-windows' counts.
    SlidingWindow(Box<SlidingWindowState>),
    /// Each tier's pool (a boxed slice is two words: boxed again, one).
    Tiered(Box<TieredState>),
    /// Requests in flight.
    Concurrency(ConcurrencyState),
}

/// Whether a bucket's fraction of a nanosecond fits the inline state.
fn narrow(params: &tollgate_core::algo::gcra::GcraParams) -> bool {
    u32::try_from(params.amount).is_ok()
}

impl AnyState {
    /// The state of a key never seen, for `params`.
    pub fn fresh(params: &Params) -> AnyState {
        match params {
            Params::Gcra(p) if narrow(p) => AnyState::Gcra { ns: 0, frac: 0 },
            Params::Gcra(_) => AnyState::WideGcra(Box::default()),
            Params::FixedWindow(_) => AnyState::FixedWindow(Box::default()),
            Params::SlidingWindow(_) => AnyState::SlidingWindow(Box::default()),
            Params::Tiered(_) => AnyState::Tiered(Box::default()),
            Params::Concurrency(_) => AnyState::Concurrency(0),
        }
    }

    /// This key's state after a reload changed its limit from `old` to
    /// `new` at `now` (same algorithm; see `tollgate_core::carry`): a
    /// bucket's debt and tiered pools are reshaped; a window's count and the
    /// requests in flight mean the same under any quota.
    pub fn carry(&mut self, old: &Params, new: &Params, now: Nanos) {
        match (old, new) {
            (Params::Gcra(old), Params::Gcra(gcra_new)) => {
                // A carried TAT is whole nanoseconds: it fits either form.
                let tat = gcra::carried(old, gcra_new, self.tat().unwrap_or_default(), now);
                *self = AnyState::fresh(new);
                match self {
                    AnyState::Gcra { ns, frac } => (*ns, *frac) = (tat.ns, tat.frac as u32),
                    AnyState::WideGcra(wide) => **wide = tat,
                    _ => {}
                }
            }
            (Params::Tiered(old), Params::Tiered(new)) => {
                if let AnyState::Tiered(pools) = self {
                    **pools = tiered::carried(old, new, pools);
                }
            }
            _ => {}
        }
    }

    /// A bucket's TAT, whichever form it is kept in.
    fn tat(&self) -> Option<GcraState> {
        match self {
            AnyState::Gcra { ns, frac } => Some(GcraState {
                ns: *ns,
                frac: u64::from(*frac),
            }),
            AnyState::WideGcra(wide) => Some(**wide),
            _ => None,
        }
    }

    /// `then` run on this state's meter under `params`: a bucket kept
    /// inline on its own type (one limit's decision, the usual case, then
    /// goes without `AnyMeter`'s dispatch at every step), any other state
    /// on `AnyMeter`.
    #[inline]
    pub fn with_meter<T: WithMeter>(&mut self, params: &Params, then: T) -> T::Out {
        match (params, self) {
            (Params::Gcra(params), AnyState::Gcra { ns, frac }) => {
                then.run(InlineGcra::new(ns, frac, params))
            }
            (params, state) => then.run(state.meter(params)),
        }
    }

    /// This state under its limit's parameters, as a meter.
    #[inline]
    pub fn meter<'a>(&'a mut self, params: &'a Params) -> AnyMeter<'a> {
        match (params, self) {
            (Params::Gcra(params), AnyState::Gcra { ns, frac }) => {
                AnyMeter::Gcra(InlineGcra::new(ns, frac, params))
            }
            (Params::Gcra(params), AnyState::WideGcra(tat)) => {
                AnyMeter::WideGcra(Gcra { params, tat })
            }
            (Params::FixedWindow(params), AnyState::FixedWindow(state)) => {
                AnyMeter::FixedWindow(FixedWindow::new(params, state))
            }
            (Params::SlidingWindow(params), AnyState::SlidingWindow(state)) => {
                AnyMeter::SlidingWindow(SlidingWindow { params, state })
            }
            (Params::Tiered(params), AnyState::Tiered(state)) => {
                AnyMeter::Tiered(Tiered { params, state })
            }
            (Params::Concurrency(params), AnyState::Concurrency(in_flight)) => {
                AnyMeter::Concurrency(Concurrency { params, in_flight })
            }
            (params, state) => state.refreshed(params),
        }
    }

    /// A state that does not fit `params` made fresh under them, as a
    /// meter. A table is built for one algorithm, so this cannot happen.
    /// (apart and cold: kept in `meter`, its recursion stops `meter` being inlined)
    #[cold]
    #[inline(never)]
    fn refreshed<'a>(&'a mut self, params: &'a Params) -> AnyMeter<'a> {
        debug_assert!(false, "state {self:?} under params {params:?}");
        *self = AnyState::fresh(params);
        self.meter(params)
    }
}

/// What is done with a key's meter, whichever type it has (`AnyState::with_meter`).
pub trait WithMeter {
    /// What it gives.
    type Out;
    /// Do it with `meter`.
    fn run<M: Meter>(self, meter: M) -> Self::Out;
}

/// A bucket kept inline: the meter works on the whole TAT and writes it
/// back, its fraction in 32 bits, each time it changes it.
#[derive(Debug)]
pub struct InlineGcra<'a> {
    tat: GcraState,
    ns: &'a mut Nanos,
    frac: &'a mut u32,
    params: &'a tollgate_core::algo::gcra::GcraParams,
}

impl<'a> InlineGcra<'a> {
    /// The TAT kept in `ns` and `frac`, under `params`.
    #[inline]
    fn new(
        ns: &'a mut Nanos,
        frac: &'a mut u32,
        params: &'a tollgate_core::algo::gcra::GcraParams,
    ) -> Self {
        InlineGcra {
            tat: GcraState {
                ns: *ns,
                frac: u64::from(*frac),
            },
            ns,
            frac,
            params,
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Gcra<'_>) -> T) -> T {
        let mut tat = self.tat;
        f(&Gcra {
            params: self.params,
            tat: &mut tat,
        })
    }
    /// `f` on the TAT, written back at once. (Not when the meter is
    /// dropped: a decision built before such a drop was built aside and
    /// copied out whole, 30 to 50 instructions a decision.)
    #[inline]
    fn write(&mut self, f: impl FnOnce(&mut Gcra<'_>)) {
        f(&mut Gcra {
            params: self.params,
            tat: &mut self.tat,
        });
        // frac < amount, which `narrow` keeps within 32 bits.
        (*self.ns, *self.frac) = (self.tat.ns, self.tat.frac as u32);
    }
}

impl Meter for InlineGcra<'_> {
    #[inline]
    fn earliest(&self, now: Nanos, cost: u64, from: Nanos) -> Earliest {
        self.read(|m| m.earliest(now, cost, from))
    }
    fn reservable(&self, now: Nanos, at: Nanos) -> bool {
        self.read(|m| m.reservable(now, at))
    }
    #[inline]
    fn commit(&mut self, now: Nanos, cost: u64, at: Nanos) {
        self.write(|m| m.commit(now, cost, at));
    }
    fn debit(&mut self, now: Nanos, amount: u64) {
        self.write(|m| m.debit(now, amount));
    }
    #[inline]
    fn usage(&self, now: Nanos) -> Usage {
        self.read(|m| m.usage(now))
    }
    #[inline]
    fn at_rest(&self, now: Nanos) -> bool {
        self.read(|m| m.at_rest(now))
    }
}

#[derive(Debug)]
pub enum AnyMeter<'a> {
    Gcra(InlineGcra<'a>),
    WideGcra(Gcra<'a>),
    FixedWindow(FixedWindow<'a>),
    SlidingWindow(SlidingWindow<'a>),
    Tiered(Tiered<'a>),
    Concurrency(Concurrency<'a>),
}

macro_rules! each {
    ($self:ident, $m:ident => $e:expr) => {
        match $self {
            AnyMeter::Gcra($m) => $e,
            AnyMeter::WideGcra($m) => $e,
            AnyMeter::FixedWindow($m) => $e,
            AnyMeter::SlidingWindow($m) => $e,
            AnyMeter::Tiered($m) => $e,
            AnyMeter::Concurrency($m) => $e,
        }
    };
}

impl Meter for AnyMeter<'_> {
    #[inline]
    fn earliest(&self, now: Nanos, cost: u64, from: Nanos) -> Earliest {
        each!(self, m => m.earliest(now, cost, from))
    }
    fn reservable(&self, now: Nanos, at: Nanos) -> bool {
        each!(self, m => m.reservable(now, at))
    }
    #[inline]
    fn commit(&mut self, now: Nanos, cost: u64, at: Nanos) {
        each!(self, m => m.commit(now, cost, at))
    }
    fn debit(&mut self, now: Nanos, amount: u64) {
        each!(self, m => m.debit(now, amount))
    }
    fn release(&mut self, amount: u64) {
        each!(self, m => m.release(amount))
    }
    #[inline]
    fn usage(&self, now: Nanos) -> Usage {
        each!(self, m => m.usage(now))
    }
    #[inline]
    fn at_rest(&self, now: Nanos) -> bool {
        each!(self, m => m.at_rest(now))
    }
}

#[cfg(test)]
mod tests {
    use super::AnyState;

    /// A bucket keeps its exact TAT inline, its fraction in 32 bits; a rate
    /// whose amount needs more keeps it boxed; a reload between the two
    /// carries it across.
    #[test]
    fn buckets_keep_their_exact_tat_inline_or_boxed() {
        use tollgate_core::algo::gcra::GcraParams;
        use tollgate_core::algo::Meter;
        use tollgate_core::policy::Params;
        use tollgate_core::units::Rate;
        let bucket = |amount: u64| {
            Params::Gcra(GcraParams::with_rate(
                10,
                Rate {
                    amount,
                    per: 1_000_000_000,
                },
            ))
        };
        let (narrow, wide) = (bucket(3), bucket(5_000_000_000));
        let now = 1_000_000_000_000;
        let mut a = AnyState::fresh(&narrow);
        assert!(matches!(a, AnyState::Gcra { .. }));
        a.meter(&narrow).commit(now, 1, now); // 1/3 s: 333,333,333 ns and 1/3
        assert_eq!(
            a,
            AnyState::Gcra {
                ns: now + 333_333_333,
                frac: 1
            }
        );
        assert_eq!(a.meter(&narrow).usage(now).remaining, 9);
        let mut b = AnyState::fresh(&wide);
        assert!(matches!(b, AnyState::WideGcra(_)));
        b.meter(&wide).commit(now, 7, now); // 7 / 5e9 s: 1 ns and 2e9/5e9
        assert_eq!(
            b.tat().map(|t| (t.ns, t.frac)),
            Some((now + 1, 2_000_000_000))
        );
        // Carried to the narrow rate: the same 7 units owed, rounded up to a
        // whole nanosecond (2,333,333,334 ns).
        b.carry(&wide, &narrow, now);
        assert_eq!(
            b,
            AnyState::Gcra {
                ns: now + 2_333_333_334,
                frac: 0
            }
        );
        assert_eq!(b.meter(&narrow).usage(now + 1).remaining, 3);
    }

    /// Every tracked key pays for this (see bench/RESULTS.md, memory per key).
    #[test]
    fn a_tracked_state_stays_at_16_bytes() {
        assert_eq!(std::mem::size_of::<AnyState>(), 16);
    }
}
