//! Generation identifiers, DRBD's model: which data history a replica holds.
//!
//! - `current` names the data as it is now;
//! - `bitmap` is non-zero while the bitmap tracks changes made since the peer last had the
//!   data named by it (the peer's `current` at the moment tracking started);
//! - `history` remembers the two previous `bitmap` values, so a peer that is further
//!   behind is still recognised (and then gets a full sync, because the bitmap no longer
//!   covers everything it misses).
//!
//! Comparing two replicas' identifiers tells which one is newer, whether the bitmap is
//! enough to bring the older one up to date, or whether both changed independently
//! (split brain).

use serde::{Deserialize, Serialize};

/// The `current` of metadata that never held data.
pub const JUST_CREATED: u64 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Generations {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

impl Generations {
    pub fn just_created() -> Self {
        Generations { current: JUST_CREATED, bitmap: 0, history: [0, 0] }
    }

    pub fn is_just_created(&self) -> bool {
        self.current == JUST_CREATED
    }

    /// Starts tracking changes the peer does not have: the peer's data is the present
    /// `current`, from now on named by `bitmap`; the local data gets the new name `fresh`.
    /// Already tracking means the bitmap already covers everything since `bitmap`, so only
    /// `current` changes.
    pub fn start_tracking(&mut self, fresh: u64) {
        if self.bitmap == 0 {
            self.bitmap = self.current;
        } else {
            self.push_history(self.current);
        }
        self.current = fresh;
    }

    /// The peer caught up with `current`: the bitmap's base becomes history.
    pub fn finish_tracking(&mut self) {
        if self.bitmap != 0 {
            let base = self.bitmap;
            self.push_history(base);
            self.bitmap = 0;
        }
    }

    /// A forced promotion of data the peer cannot vouch for: it becomes a new history,
    /// and the peer (if it shares the old `current`) will receive a full sync.
    pub fn force_new(&mut self, fresh: u64) {
        if self.current != JUST_CREATED {
            self.push_history(self.current);
        }
        if self.bitmap != 0 {
            self.push_history(self.bitmap);
            self.bitmap = 0;
        }
        self.current = fresh;
    }

    fn push_history(&mut self, value: u64) {
        if value == 0 || value == JUST_CREATED || self.history[0] == value {
            return;
        }
        self.history[1] = self.history[0];
        self.history[0] = value;
    }

    fn in_history(&self, value: u64) -> bool {
        value != 0 && self.history.contains(&value)
    }

    fn ancestors(&self) -> [u64; 3] {
        [self.bitmap, self.history[0], self.history[1]]
    }
}

/// How two replicas' data histories relate, from the local replica's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// Both hold the same generation.
    Same,
    /// Both were just created and never held data.
    BothJustCreated,
    /// The local data descends from the peer's; `full` when the bitmap does not cover
    /// the difference.
    LocalNewer {
        full: bool,
    },
    PeerNewer {
        full: bool,
    },
    /// Both changed since a common ancestor; `full` when no bitmap covers the divergence.
    Diverged {
        full: bool,
    },
    /// No common history at all: not the same volume's data.
    Unrelated,
}

impl Relation {
    pub fn mirror(self) -> Relation {
        match self {
            Relation::LocalNewer { full } => Relation::PeerNewer { full },
            Relation::PeerNewer { full } => Relation::LocalNewer { full },
            other => other,
        }
    }
}

/// Compares generation identifiers; `compare(a, b) == compare(b, a).mirror()`.
pub fn compare(local: &Generations, peer: &Generations) -> Relation {
    let (a, b) = (local, peer);
    match (a.is_just_created(), b.is_just_created()) {
        (true, true) => return Relation::BothJustCreated,
        (false, true) => return Relation::LocalNewer { full: true },
        (true, false) => return Relation::PeerNewer { full: true },
        (false, false) => {}
    }
    if a.current == b.current {
        return Relation::Same;
    }
    let a_tracks_b = a.bitmap != 0 && a.bitmap == b.current;
    let b_tracks_a = b.bitmap != 0 && b.bitmap == a.current;
    match (a_tracks_b, b_tracks_a) {
        (true, false) => return Relation::LocalNewer { full: false },
        (false, true) => return Relation::PeerNewer { full: false },
        (true, true) => return Relation::Diverged { full: true },
        (false, false) => {}
    }
    if a.bitmap != 0 && a.bitmap == b.bitmap {
        return Relation::Diverged { full: false };
    }
    match (a.in_history(b.current), b.in_history(a.current)) {
        (true, false) => return Relation::LocalNewer { full: true },
        (false, true) => return Relation::PeerNewer { full: true },
        (true, true) => return Relation::Diverged { full: true },
        (false, false) => {}
    }
    let common = a.ancestors().iter().any(|&x| x != 0 && x != JUST_CREATED && b.ancestors().contains(&x));
    if common { Relation::Diverged { full: true } } else { Relation::Unrelated }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(current: u64, bitmap: u64, h0: u64, h1: u64) -> Generations {
        Generations { current, bitmap, history: [h0, h1] }
    }

    #[test]
    fn tracking_rotates_like_drbd() {
        let mut x = g(100, 0, 0, 0);
        x.start_tracking(200);
        assert_eq!(x, g(200, 100, 0, 0));
        x.start_tracking(300);
        assert_eq!(x, g(300, 100, 200, 0), "still tracking since 100; 200 kept as history");
        x.finish_tracking();
        assert_eq!(x, g(300, 0, 100, 200));
        x.finish_tracking();
        assert_eq!(x, g(300, 0, 100, 200), "idempotent");
        x.force_new(400);
        assert_eq!(x, g(400, 0, 300, 100));
    }

    #[test]
    fn relations_cover_drbd_cases() {
        let cases = [
            (g(1, 0, 0, 0), g(1, 0, 0, 0), Relation::Same),
            (Generations::just_created(), Generations::just_created(), Relation::BothJustCreated),
            (g(9, 0, 0, 0), Generations::just_created(), Relation::LocalNewer { full: true }),
            // failover: the survivor tracks since the crashed primary's current
            (g(2, 1, 0, 0), g(1, 0, 0, 0), Relation::LocalNewer { full: false }),
            (g(1, 0, 0, 0), g(2, 1, 0, 0), Relation::PeerNewer { full: false }),
            // both wrote after the partition
            (g(2, 1, 0, 0), g(3, 1, 0, 0), Relation::Diverged { full: false }),
            // the peer is so far behind that only history knows it
            (g(50, 40, 10, 0), g(10, 0, 0, 0), Relation::LocalNewer { full: true }),
            // diverged long ago, bitmaps no longer comparable
            (g(70, 60, 10, 0), g(80, 50, 10, 0), Relation::Diverged { full: true }),
            (g(70, 0, 0, 0), g(80, 0, 0, 0), Relation::Unrelated),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare(&a, &b), want, "{a:?} vs {b:?}");
            assert_eq!(compare(&b, &a), want.mirror(), "mirror of {a:?} vs {b:?}");
        }
    }
}
