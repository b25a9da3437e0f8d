//! The handshake decision: given both replicas' announcements, what happens next.
//!
//! Both sides run [`decide`] on the same two [`Hello`]s (each from its own point of view)
//! and reach mirrored decisions, so no negotiation round is needed:
//! `decide(a, b) == decide(b, a).mirror()`.
//!
//! The two hellos may be in different layout versions during a rolling upgrade; a field
//! only the newer layout carries counts only when both hellos carry it (see [`both_speak`]),
//! because each side must decide on exactly what the other one knows.

use super::generation::{Relation, compare};
use super::split_brain::{self, ResolvedBy, Verdict};
use super::wire::{Hello, WireDisk, WireRole};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Same data: replicate from here on.
    InSync,
    /// Both replicas are freshly created sparse files (all zeroes): they are identical
    /// already; both adopt `current` and become UpToDate without a sync.
    InitialSkip { current: u64 },
    /// Bring the target up to date from the source, from the bitmaps or in full.
    Resync { local_is_source: bool, full: bool, reason: SyncReason },
    /// Both changed independently and no rule picked a loser.
    SplitBrain { reason: String },
    /// Neither side holds consistent data; a forced promotion must choose.
    WaitForForce { reason: String },
    /// The peer is not a valid partner for this volume.
    Refuse { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncReason {
    /// The target missed changes while disconnected.
    TargetBehind,
    /// The target's data is inconsistent (interrupted resync, forced or initial sync).
    TargetInconsistent,
    /// A replica crashed as primary; its activity-log extents are resynced.
    CrashedPrimary,
    /// Blocks marked out of sync (by verify) are resynced from the primary.
    OutOfSyncBlocks,
    /// A split brain was resolved; the target's changes are discarded.
    SplitBrainResolved(ResolvedBy),
    /// The target was fenced while primary and the source has been promoted in a newer
    /// epoch since: the target's writes after its fence, refused to its clients, are
    /// discarded.
    Superseded,
}

/// How a discard record names the rule that discarded a superseded primary's writes.
pub const SUPERSEDED_LABEL: &str = "superseded-primary";

impl SyncReason {
    pub fn label(&self) -> String {
        match self {
            SyncReason::TargetBehind => "target missed changes while disconnected".into(),
            SyncReason::TargetInconsistent => "target data is inconsistent".into(),
            SyncReason::CrashedPrimary => "primary crashed; resyncing its activity-log extents".into(),
            SyncReason::OutOfSyncBlocks => "resyncing blocks marked out of sync".into(),
            SyncReason::SplitBrainResolved(by) => format!("split brain resolved by {}", by.label()),
            SyncReason::Superseded => {
                "the target was fenced as primary and a newer primary has served since; its later writes are discarded"
                    .into()
            }
        }
    }

    /// The rule a discard record names, when this resync discards the target's changes.
    pub fn discards(&self) -> Option<&'static str> {
        match self {
            SyncReason::SplitBrainResolved(by) => Some(by.label()),
            SyncReason::Superseded => Some(SUPERSEDED_LABEL),
            _ => None,
        }
    }
}

impl Decision {
    pub fn mirror(self) -> Decision {
        match self {
            Decision::Resync { local_is_source, full, reason } => {
                Decision::Resync { local_is_source: !local_is_source, full, reason }
            }
            other => other,
        }
    }
}

/// Checks that the peer describes the same volume; the error names what differs.
pub fn check_peer(local: &Hello, peer: &Hello, expected_peer: &str) -> Result<(), String> {
    if peer.node != expected_peer {
        return Err(format!("peer calls itself {:?}, expected {expected_peer:?}", peer.node));
    }
    if peer.volume_uuid != local.volume_uuid {
        return Err(format!(
            "peer {} holds volume {}, this replica is volume {}",
            peer.node,
            uuid::Uuid::from_bytes(peer.volume_uuid),
            uuid::Uuid::from_bytes(local.volume_uuid)
        ));
    }
    if peer.size != local.size {
        return Err(format!("peer {} has a {}-byte volume, this replica {} bytes", peer.node, peer.size, local.size));
    }
    if peer.protocol != local.protocol {
        return Err(format!(
            "peer {} replicates with protocol {:?}, this replica with {:?}",
            peer.node, peer.protocol, local.protocol
        ));
    }
    Ok(())
}

fn consistent(d: WireDisk) -> bool {
    d != WireDisk::Inconsistent
}

/// Whether both hellos are in layout `version` or later.
pub fn both_speak(a: &Hello, b: &Hello, version: u32) -> bool {
    a.version.min(b.version) >= version
}

/// When one replica was fenced as primary and the other promoted in a newer epoch since,
/// whether the local one is the newer primary (the source). The fenced one stopped serving
/// at its fence: every write it took after that was refused to its writer, so the newer
/// primary's data is the only one any client has relied on since. This is what keeps a
/// primary isolated under writes from coming back as a split brain; a real split brain
/// (both served) has no fenced side and still goes by the policy.
fn superseded(a: &Hello, b: &Hello) -> Option<bool> {
    if !both_speak(a, b, 2) {
        return None;
    }
    if a.superseded && b.promoted_epoch > a.promoted_epoch {
        return Some(false);
    }
    if b.superseded && a.promoted_epoch > b.promoted_epoch {
        return Some(true);
    }
    None
}

/// Decides what the connection does, from the local replica's point of view.
pub fn decide(local: &Hello, peer: &Hello) -> Decision {
    let (a, b) = (local, peer);
    let superseded = superseded(a, b);
    if a.role == WireRole::Primary && b.role == WireRole::Primary {
        if let Some(local_is_source) = superseded {
            let old = if local_is_source { b } else { a };
            return Decision::Refuse {
                reason: format!(
                    "{} was fenced as primary in epoch {} and is not demoted yet; it resyncs from the newer primary once it is",
                    old.node, old.promoted_epoch
                ),
            };
        }
        return Decision::SplitBrain { reason: "both replicas are primary".into() };
    }
    if let Some(local_is_source) = superseded {
        match compare(&a.gens, &b.gens) {
            Relation::LocalNewer { full } | Relation::PeerNewer { full } | Relation::Diverged { full } => {
                return directed(a, b, local_is_source, full, SyncReason::Superseded);
            }
            Relation::Same if a.dirty_blocks > 0 || b.dirty_blocks > 0 => {
                return directed(a, b, local_is_source, false, SyncReason::Superseded);
            }
            Relation::Same | Relation::BothJustCreated | Relation::Unrelated => {}
        }
    }
    match compare(&a.gens, &b.gens) {
        Relation::BothJustCreated => {
            if a.data_zeroed && b.data_zeroed && a.disk == WireDisk::Inconsistent && b.disk == WireDisk::Inconsistent {
                let (lo, hi) =
                    if a.format_id <= b.format_id { (a.format_id, b.format_id) } else { (b.format_id, a.format_id) };
                let mut seed = [0u8; 16];
                seed[..8].copy_from_slice(&lo.to_le_bytes());
                seed[8..].copy_from_slice(&hi.to_le_bytes());
                let current = xxhash_rust::xxh3::xxh3_64(&seed) | 0x100;
                Decision::InitialSkip { current }
            } else {
                Decision::WaitForForce {
                    reason:
                        "both replicas are new and their data may differ; force one primary to start the initial sync"
                            .into(),
                }
            }
        }
        Relation::Same => same_generation(a, b),
        Relation::LocalNewer { full } => directed(a, b, true, full, SyncReason::TargetBehind),
        Relation::PeerNewer { full } => directed(a, b, false, full, SyncReason::TargetBehind),
        Relation::Diverged { full } => match split_brain::resolve(a, b) {
            Verdict::LocalLoses { by } => directed(a, b, false, full, SyncReason::SplitBrainResolved(by)),
            Verdict::PeerLoses { by } => directed(a, b, true, full, SyncReason::SplitBrainResolved(by)),
            Verdict::Undecided { reason } => Decision::SplitBrain { reason },
        },
        Relation::Unrelated => {
            let (x, y) = if a.node <= b.node { (a, b) } else { (b, a) };
            Decision::Refuse {
                reason: format!(
                    "{} (generation {:016x}) and {} (generation {:016x}) hold unrelated data: resolve by hand",
                    x.node, x.gens.current, y.node, y.gens.current
                ),
            }
        }
    }
}

fn directed(a: &Hello, b: &Hello, local_is_source: bool, full: bool, reason: SyncReason) -> Decision {
    let (source, target) = if local_is_source { (a, b) } else { (b, a) };
    if !consistent(source.disk) {
        return Decision::WaitForForce { reason: format!("{} has the newer data but it is inconsistent", source.node) };
    }
    if target.role == WireRole::Primary {
        return Decision::Refuse {
            reason: format!("{} is primary but would have to become sync target of {}", target.node, source.node),
        };
    }
    let reason = if target.disk == WireDisk::Inconsistent && reason == SyncReason::TargetBehind {
        SyncReason::TargetInconsistent
    } else {
        reason
    };
    Decision::Resync { local_is_source, full, reason }
}

fn same_generation(a: &Hello, b: &Hello) -> Decision {
    match (consistent(a.disk), consistent(b.disk)) {
        (false, false) => {
            return Decision::WaitForForce { reason: "both replicas are inconsistent".into() };
        }
        (true, false) => return directed(a, b, true, false, SyncReason::TargetInconsistent),
        (false, true) => return directed(a, b, false, false, SyncReason::TargetInconsistent),
        (true, true) => {}
    }
    let a_primary = a.role == WireRole::Primary;
    let b_primary = b.role == WireRole::Primary;
    let any_bits = a.dirty_blocks > 0 || b.dirty_blocks > 0;
    let crashed = a.crashed_primary || b.crashed_primary;
    if !(any_bits || crashed) {
        return Decision::InSync;
    }
    let reason = if crashed { SyncReason::CrashedPrimary } else { SyncReason::OutOfSyncBlocks };
    // A serving primary is always the source: its data is what clients see.
    if a_primary != b_primary {
        return directed(a, b, a_primary, false, reason);
    }
    if a.crashed_primary != b.crashed_primary {
        return directed(a, b, a.crashed_primary, false, reason);
    }
    if crashed {
        // Both crashed as primary with the same generation: none of the unreplicated writes
        // was acknowledged, so either direction is correct; pick the later promotion.
        let ka = (a.promoted_epoch, a.promoted_at_ms, a.format_id, &a.node);
        let kb = (b.promoted_epoch, b.promoted_at_ms, b.format_id, &b.node);
        return directed(a, b, ka > kb, false, reason);
    }
    // Out-of-sync blocks and nobody primary: which copy is right is not known; keep the
    // bits until one replica is promoted, which then resyncs them.
    Decision::InSync
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::protocol::Range;
    use crate::replication::generation::{Generations, JUST_CREATED};
    use crate::replication::wire::{PROTOCOL_VERSION, Resolution, WirePolicy, WireProtocol};
    use rand::{Rng, SeedableRng};

    fn hello(node: &str, current: u64, bitmap: u64) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            speaks: Range::ours(),
            node: node.into(),
            volume_uuid: [1; 16],
            size: 1 << 30,
            gens: Generations { current, bitmap, history: [0, 0] },
            disk: WireDisk::UpToDate,
            role: WireRole::Secondary,
            crashed_primary: false,
            data_zeroed: false,
            superseded: false,
            dirty_blocks: 0,
            promoted_epoch: 0,
            promoted_at_ms: 0,
            format_id: node.len() as u64 * 1000 + u64::from(node.as_bytes()[0]),
            policy: WirePolicy::Manual,
            protocol: WireProtocol::C,
            resolution: None,
        }
    }

    fn both(a: &Hello, b: &Hello) -> Decision {
        let d = decide(a, b);
        assert_eq!(decide(b, a), d.clone().mirror(), "decisions must mirror for {a:?} / {b:?}");
        d
    }

    #[test]
    fn identical_generations_are_in_sync() {
        assert_eq!(both(&hello("a", 100, 0), &hello("b", 100, 0)), Decision::InSync);
    }

    #[test]
    fn fresh_zeroed_pair_skips_the_initial_sync() {
        let mut a = hello("a", JUST_CREATED, 0);
        let mut b = hello("b", JUST_CREATED, 0);
        for h in [&mut a, &mut b] {
            h.disk = WireDisk::Inconsistent;
            h.data_zeroed = true;
        }
        let Decision::InitialSkip { current } = both(&a, &b) else { panic!("expected initial skip") };
        assert!(current > JUST_CREATED);
        b.data_zeroed = false;
        assert!(matches!(both(&a, &b), Decision::WaitForForce { .. }));
    }

    #[test]
    fn failover_survivor_resyncs_the_crashed_primary_from_its_bitmap() {
        let mut survivor = hello("b", 200, 100);
        survivor.role = WireRole::Primary;
        let mut crashed = hello("a", 100, 0);
        crashed.crashed_primary = true;
        crashed.dirty_blocks = 2048;
        assert_eq!(
            both(&survivor, &crashed),
            Decision::Resync { local_is_source: true, full: false, reason: SyncReason::TargetBehind }
        );
    }

    #[test]
    fn crashed_primary_restarting_alone_sends_its_hot_extents() {
        let mut crashed = hello("a", 100, 0);
        crashed.crashed_primary = true;
        crashed.dirty_blocks = 1024;
        let peer = hello("b", 100, 0);
        assert_eq!(
            both(&crashed, &peer),
            Decision::Resync { local_is_source: true, full: false, reason: SyncReason::CrashedPrimary }
        );
        // ...unless the peer already serves as primary: then the peer's data wins.
        let mut primary = peer.clone();
        primary.role = WireRole::Primary;
        assert_eq!(
            both(&crashed, &primary),
            Decision::Resync { local_is_source: false, full: false, reason: SyncReason::CrashedPrimary }
        );
    }

    #[test]
    fn out_of_sync_blocks_go_from_the_primary_or_wait() {
        let mut a = hello("a", 100, 0);
        a.dirty_blocks = 1;
        let b = hello("b", 100, 0);
        assert_eq!(both(&a, &b), Decision::InSync);
        let mut bp = b.clone();
        bp.role = WireRole::Primary;
        assert_eq!(
            both(&a, &bp),
            Decision::Resync { local_is_source: false, full: false, reason: SyncReason::OutOfSyncBlocks }
        );
    }

    #[test]
    fn interrupted_resync_resumes_in_the_same_direction() {
        let source = hello("a", 200, 100);
        let mut target = hello("b", 100, 0);
        target.disk = WireDisk::Inconsistent;
        assert_eq!(
            both(&source, &target),
            Decision::Resync { local_is_source: true, full: false, reason: SyncReason::TargetInconsistent }
        );
        // An inconsistent replica with the newer generation cannot be a source.
        let mut newer_but_broken = hello("a", 200, 100);
        newer_but_broken.disk = WireDisk::Inconsistent;
        assert!(matches!(both(&newer_but_broken, &hello("b", 100, 0)), Decision::WaitForForce { .. }));
    }

    #[test]
    fn a_primary_is_never_made_sync_target() {
        let mut old_primary = hello("a", 100, 0);
        old_primary.role = WireRole::Primary;
        let newer = hello("b", 200, 100);
        assert!(matches!(both(&old_primary, &newer), Decision::Refuse { .. }));
    }

    #[test]
    fn split_brain_policies() {
        let mut a = hello("a", 300, 100);
        let mut b = hello("b", 400, 100);
        a.dirty_blocks = 10;
        b.dirty_blocks = 3;
        a.promoted_epoch = 1;
        b.promoted_epoch = 2;
        assert!(matches!(both(&a, &b), Decision::SplitBrain { .. }), "manual by default");

        a.policy = WirePolicy::DiscardYoungerPrimary;
        b.policy = WirePolicy::DiscardYoungerPrimary;
        let sb = SyncReason::SplitBrainResolved(ResolvedBy::DiscardYoungerPrimary);
        assert_eq!(both(&a, &b), Decision::Resync { local_is_source: true, full: false, reason: sb });

        a.policy = WirePolicy::DiscardLeastChanges;
        b.policy = WirePolicy::DiscardLeastChanges;
        let sb = SyncReason::SplitBrainResolved(ResolvedBy::DiscardLeastChanges);
        assert_eq!(both(&a, &b), Decision::Resync { local_is_source: true, full: false, reason: sb });
        b.dirty_blocks = 50;
        assert_eq!(both(&a, &b), Decision::Resync { local_is_source: false, full: false, reason: sb });

        // The loser is primary: nothing is discarded until it is demoted.
        a.role = WireRole::Primary;
        let Decision::SplitBrain { reason } = both(&a, &b) else { panic!("expected split brain") };
        assert!(reason.contains("demote"), "{reason}");

        // Policies that differ between the nodes resolve nothing.
        a.role = WireRole::Secondary;
        b.policy = WirePolicy::DiscardYoungerPrimary;
        assert!(matches!(both(&a, &b), Decision::SplitBrain { .. }));
    }

    /// The isolation case: `a`, primary in epoch 2, lost its lease and fenced with writes
    /// its peer never got; `b` was promoted in epoch 3 and wrote as well.
    fn isolated_pair() -> (Hello, Hello) {
        let mut a = hello("a", 300, 100);
        a.superseded = true;
        a.promoted_epoch = 2;
        a.dirty_blocks = 4;
        let mut b = hello("b", 400, 100);
        b.role = WireRole::Primary;
        b.promoted_epoch = 3;
        b.dirty_blocks = 9;
        (a, b)
    }

    #[test]
    fn a_superseded_primary_resyncs_from_the_newer_one_instead_of_a_split_brain() {
        let (a, b) = isolated_pair();
        let want = Decision::Resync { local_is_source: false, full: false, reason: SyncReason::Superseded };
        assert_eq!(both(&a, &b), want);
        assert_eq!(SyncReason::Superseded.discards(), Some(SUPERSEDED_LABEL));
        // The newer primary need not be serving any more: its epoch is what counts.
        let mut b_demoted = b.clone();
        b_demoted.role = WireRole::Secondary;
        assert_eq!(both(&a, &b_demoted), want);
        // The fenced one holding the newer generation (the new primary never wrote) still
        // yields, with its bitmap saying what to take back.
        let b_idle = Hello { gens: Generations { current: 100, bitmap: 0, history: [0, 0] }, dirty_blocks: 0, ..b };
        assert_eq!(
            both(&a, &b_idle),
            Decision::Resync { local_is_source: false, full: false, reason: SyncReason::Superseded }
        );
    }

    #[test]
    fn a_superseded_primary_not_yet_demoted_waits_rather_than_a_split_brain() {
        let (mut a, b) = isolated_pair();
        a.role = WireRole::Primary;
        let Decision::Refuse { reason } = both(&a, &b) else { panic!("expected a refusal") };
        assert!(reason.contains("a was fenced as primary in epoch 2 and is not demoted yet"), "{reason}");
    }

    #[test]
    fn superseded_counts_only_against_a_newer_epoch_and_only_in_version_2() {
        let (mut a, mut b) = isolated_pair();
        // A fence older than nothing: the other side was not promoted after it.
        b.promoted_epoch = 2;
        assert!(matches!(both(&a, &b), Decision::SplitBrain { .. }));
        b.promoted_epoch = 3;
        // A previous-release peer cannot know the flag, so neither side uses it.
        b.version = 1;
        b.speaks = Range::V1;
        assert!(matches!(both(&a, &b), Decision::SplitBrain { .. }));
        b.version = PROTOCOL_VERSION;
        a.version = 1;
        assert!(matches!(both(&a, &b), Decision::SplitBrain { .. }));
    }

    #[test]
    fn operator_resolution_beats_policy() {
        let mut a = hello("a", 300, 100);
        let mut b = hello("b", 400, 100);
        b.resolution = Some(Resolution::DiscardLocal);
        let op = SyncReason::SplitBrainResolved(ResolvedBy::Operator);
        assert_eq!(both(&a, &b), Decision::Resync { local_is_source: true, full: false, reason: op });
        b.resolution = None;
        a.resolution = Some(Resolution::KeepLocal);
        assert_eq!(both(&a, &b), Decision::Resync { local_is_source: true, full: false, reason: op });
        b.resolution = Some(Resolution::KeepLocal);
        assert!(matches!(both(&a, &b), Decision::SplitBrain { .. }), "contradicting choices");
    }

    #[test]
    fn unrelated_data_and_foreign_peers_are_refused() {
        assert!(matches!(both(&hello("a", 300, 0), &hello("b", 400, 0)), Decision::Refuse { .. }));
        let a = hello("a", 1, 0);
        let mut b = hello("b", 1, 0);
        assert!(check_peer(&a, &b, "b").is_ok());
        assert!(check_peer(&a, &b, "c").unwrap_err().contains("expected \"c\""));
        b.volume_uuid = [2; 16];
        assert!(check_peer(&a, &b, "b").unwrap_err().contains("holds volume"));
        b.volume_uuid = [1; 16];
        b.size = 5;
        assert!(check_peer(&a, &b, "b").unwrap_err().contains("5-byte"));
    }

    #[test]
    fn decisions_mirror_for_random_pairs() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let gens = [0u64, 4, 100, 200, 300];
        let pick = |rng: &mut rand_chacha::ChaCha8Rng| gens[rng.random_range(0..gens.len())];
        for i in 0..20_000 {
            let mut h = [hello("a", 0, 0), hello("b", 0, 0)];
            for x in &mut h {
                x.gens = Generations {
                    current: pick(&mut rng).max(4),
                    bitmap: pick(&mut rng),
                    history: [pick(&mut rng), 0],
                };
                x.disk = [WireDisk::UpToDate, WireDisk::Inconsistent, WireDisk::Outdated][rng.random_range(0..3)];
                x.role = if rng.random_bool(0.3) { WireRole::Primary } else { WireRole::Secondary };
                x.crashed_primary = rng.random_bool(0.2);
                x.superseded = rng.random_bool(0.3);
                x.version = if rng.random_bool(0.2) { 1 } else { PROTOCOL_VERSION };
                x.data_zeroed = rng.random_bool(0.5);
                x.dirty_blocks = rng.random_range(0..3);
                x.promoted_epoch = rng.random_range(0..3);
                x.policy = [WirePolicy::Manual, WirePolicy::DiscardYoungerPrimary, WirePolicy::DiscardLeastChanges]
                    [rng.random_range(0..3)];
                x.resolution =
                    [None, Some(Resolution::DiscardLocal), Some(Resolution::KeepLocal)][rng.random_range(0..3)];
            }
            let [a, b] = &h;
            let _ = both(a, b);
            let _ = i;
        }
    }
}
