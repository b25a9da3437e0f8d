//! The link to the peer: handshake, liveness, incoming frames, and what this side tells it.

use super::messages::{IoOp, IoTag, Output, ReplicaEvent};
use super::{ConnId, Link, Machine, Phase, RETRY_LATER_MS, RETRY_SOON_MS, ReqId, Role, wire_disk};
use crate::replication::geometry::{BLOCK_SIZE, blocks_touched};
use crate::replication::handshake::{self, Decision, SyncReason};
use crate::replication::metadata::{StoredDisk, flags};
use crate::replication::wire::{Envelope, Frame, Hello, WireDisk, WireRole};

/// What the peer's hello version means for this connection.
enum VersionCheck {
    /// Both hellos are in the version both speak.
    Agreed,
    /// The peer wrote a layout this replica does not speak.
    Unknown(String),
    /// No version both accept.
    Mismatch(String),
    /// This side wrote the newer hello; the peer ends the connection (see `Link::outpaced`).
    Outpaced,
    /// This side wrote an older hello than both speak: start again in this version.
    Renegotiate(u8),
}

impl Machine {
    /// The layout version of the next hello.
    fn hello_version(&self) -> u32 {
        let ours = self.cfg.speaks;
        let version = match self.peer_speaks {
            None => ours.max,
            Some(peer) => crate::protocol::negotiate(ours, peer).unwrap_or(ours.min),
        };
        u32::from(version)
    }

    /// The version this connection's handshake was decided in, once both hellos are known.
    pub(super) fn agreed_version(&self) -> Option<u32> {
        let link = self.link.as_ref()?;
        link.peer.as_ref().map(|p| p.version.min(link.local_hello.version))
    }

    pub(super) fn hello(&self) -> Hello {
        Hello {
            version: self.hello_version(),
            speaks: self.cfg.speaks,
            node: self.cfg.node.clone(),
            volume_uuid: self.sb.volume_uuid,
            size: self.sb.data_size,
            gens: self.sb.gens,
            disk: wire_disk(self.sb.disk),
            role: self.wire_role(),
            crashed_primary: self.sb.has(flags::CRASHED_PRIMARY),
            data_zeroed: self.sb.has(flags::DATA_ZEROED),
            superseded: self.sb.has(flags::SUPERSEDED),
            dirty_blocks: self.bitmap.count(),
            promoted_epoch: self.sb.promoted_epoch,
            promoted_at_ms: self.sb.promoted_at_ms,
            format_id: self.sb.format_id,
            policy: self.cfg.policy,
            protocol: self.cfg.protocol,
            resolution: self.resolution,
        }
    }

    pub(super) fn on_connected(&mut self, conn: ConnId) {
        if let Some(old) = self.conn() {
            self.close(old, "replaced by a new connection from the peer", 0);
        }
        let hello = self.hello();
        self.link = Some(Link {
            conn,
            phase: Phase::AwaitHello,
            local_hello: hello.clone(),
            peer: None,
            peer_role: WireRole::Secondary,
            peer_disk: WireDisk::Inconsistent,
            last_rx_ms: self.now,
            last_ping_ms: self.now,
            opened_ms: self.now,
            sync: None,
            outpaced: false,
            heard_goodbye: false,
        });
        self.send(conn, Frame::Hello(Box::new(hello)));
    }

    pub(super) fn close(&mut self, conn: ConnId, reason: &str, retry_after_ms: u64) {
        if self.conn() == Some(conn) {
            self.send(conn, Frame::Goodbye { reason: reason.to_string() });
            self.drop_link(reason);
        }
        self.emit(Output::Close { conn, reason: reason.to_string(), retry_after_ms });
    }

    /// Forgets the link: writes the peer never acknowledged become out of sync.
    pub(super) fn drop_link(&mut self, reason: &str) {
        let Some(link) = self.link.take() else { return };
        self.held.retain(|o| !matches!(o, Output::Send { conn, .. } if *conn == link.conn));
        // The peer may or may not have applied writes it never acknowledged.
        let pending: Vec<ReqId> = std::mem::take(&mut self.peer_pending).into_values().collect();
        for req in pending {
            self.peer_finished(req, false);
        }
        let flushes: Vec<ReqId> = std::mem::take(&mut self.peer_flushes).into_values().collect();
        for req in flushes {
            self.peer_finished(req, true);
        }
        if let Some(d) = &mut self.demote {
            d.peer_flush_seq = None;
        }
        if link.phase != Phase::AwaitHello {
            self.last_peer_disk = Some(link.peer_disk);
            self.last_peer_role = Some(link.peer_role);
        }
        if link.outpaced && !link.heard_goodbye {
            // Closed without a goodbye after our newer hello: what the previous release's
            // decoder does with a layout it does not know.
            self.peer_speaks = Some(crate::protocol::Range::V1);
        }
        self.verify = None;
        self.event(ReplicaEvent::Disconnected { reason: reason.to_string() });
    }

    pub(super) fn on_frame(&mut self, conn: ConnId, env: Envelope) {
        let Some(link) = self.link.as_mut().filter(|l| l.conn == conn) else { return };
        link.last_rx_ms = self.now;
        link.heard_goodbye |= matches!(env.frame, Frame::Goodbye { .. });
        let phase = link.phase.clone();
        let frame = env.frame;
        // Writes stamped with an older epoch come from a primary that has been superseded.
        if matches!(frame, Frame::Data { .. } | Frame::Zero { .. }) && env.epoch < self.sb.known_epoch {
            let reason = format!(
                "peer {} sent a write stamped with epoch {}, older than the known epoch {}: refusing a superseded primary",
                self.cfg.peer, env.epoch, self.sb.known_epoch
            );
            self.close(conn, &reason, RETRY_LATER_MS);
            return;
        }
        self.observe_epoch(env.epoch, "the peer carries a newer epoch");
        match (phase, frame) {
            (Phase::AwaitHello, Frame::Hello(h)) => self.on_hello(conn, *h),
            (Phase::AwaitHello, Frame::Goodbye { reason }) => {
                let r = format!("peer {} closed the connection: {reason}", self.cfg.peer);
                self.close(conn, &r, RETRY_LATER_MS);
            }
            (Phase::AwaitHello, other) => {
                let r = format!("peer {} sent {} before its hello", self.cfg.peer, other.name());
                self.close(conn, &r, RETRY_LATER_MS);
            }
            (_, Frame::Hello(_)) => {
                let r = format!("peer {} sent a second hello", self.cfg.peer);
                self.close(conn, &r, RETRY_LATER_MS);
            }
            (_, Frame::Ping) => self.send(conn, Frame::PingAck),
            (_, Frame::PingAck) => {}
            (_, Frame::Goodbye { reason }) => {
                let r = format!("peer {} closed the connection: {reason}", self.cfg.peer);
                self.close(conn, &r, RETRY_SOON_MS);
            }
            (_, Frame::State { role, disk }) => self.on_peer_state(conn, role, disk),
            (_, Frame::Data { seq, offset, fua, data }) => {
                if let Some(e) = self.check_peer_write(offset, data.len() as u64) {
                    self.close(conn, &e, RETRY_LATER_MS);
                } else {
                    self.io(IoOp::Write { tag: IoTag::PeerWrite { conn, seq }, offset, data, fua });
                }
            }
            (_, Frame::Zero { seq, offset, len, fua, punch }) => {
                if let Some(e) = self.check_peer_write(offset, len) {
                    self.close(conn, &e, RETRY_LATER_MS);
                } else {
                    self.io(IoOp::Zero { tag: IoTag::PeerWrite { conn, seq }, offset, len, punch, fua });
                }
            }
            (_, Frame::Flush { seq }) => self.io(IoOp::Flush { tag: IoTag::PeerFlush { conn, seq } }),
            (_, Frame::Ack { seq, ok }) => {
                if let Some(req) = self.peer_pending.remove(&seq) {
                    self.peer_finished(req, ok);
                }
            }
            (_, Frame::FlushAck { seq, ok }) => {
                if self.demote.as_ref().is_some_and(|d| d.peer_flush_seq == Some(seq)) {
                    if let Some(d) = &mut self.demote {
                        d.peer_flush_seq = None;
                    }
                } else if let Some(req) = self.peer_flushes.remove(&seq) {
                    if !ok {
                        self.event(ReplicaEvent::IoError {
                            operation: "peer flush".into(),
                            message: format!("peer {} could not flush its disk", self.cfg.peer),
                        });
                    }
                    self.peer_finished(req, true);
                }
            }
            (Phase::Bitmaps { source }, Frame::Bitmap { start, last, runs }) => {
                self.on_peer_bitmap(conn, source, start, last, &runs)
            }
            (Phase::Ready, Frame::StartResync) => {
                if self.role == Role::Primary {
                    let r = format!("peer {} asked to resync into this primary", self.cfg.peer);
                    self.close(conn, &r, RETRY_LATER_MS);
                } else {
                    self.begin_sync(conn, false, false, SyncReason::OutOfSyncBlocks, None);
                }
            }
            (
                Phase::Syncing { source: true } | Phase::Bitmaps { source: true },
                Frame::ResyncRequest { offset, len },
            ) => self.on_resync_request(conn, offset, len),
            (Phase::Syncing { source: false }, Frame::ResyncReply { offset, data, zero_len }) => {
                self.on_resync_reply(conn, offset, data, zero_len)
            }
            (Phase::Syncing { source: true }, Frame::ResyncAck { offset, len }) => {
                let range = blocks_touched(offset, u64::from(len));
                let cleared = self.bitmap.clear_range(range);
                self.counters.resync_bytes_sent += u64::from(len);
                if let Some(sync) = self.link.as_mut().and_then(|l| l.sync.as_mut()) {
                    sync.meter.add(cleared * BLOCK_SIZE, self.now);
                }
            }
            (Phase::Syncing { source: true }, Frame::SyncDone { gens }) => self.on_sync_done(conn, gens),
            (Phase::Ready, Frame::VerifyRequest { offset, len }) => {
                let range = blocks_touched(offset, u64::from(len));
                if offset % BLOCK_SIZE != 0 || range.end > self.blocks() {
                    let r = format!("peer {} asked to verify outside the volume", self.cfg.peer);
                    self.close(conn, &r, RETRY_LATER_MS);
                } else {
                    self.io(IoOp::Digest { tag: IoTag::VerifyPeer { conn, range }, offset, len });
                }
            }
            (Phase::Ready, Frame::VerifyReply { offset, digests }) => self.on_verify_reply(conn, offset, digests),
            (_, Frame::OutOfSync { offset, len }) => {
                if offset.checked_add(len).is_none_or(|e| e > self.size()) {
                    let r = format!("peer {} marked blocks outside the volume", self.cfg.peer);
                    self.close(conn, &r, RETRY_LATER_MS);
                } else {
                    self.bitmap.set_range(blocks_touched(offset, len));
                }
            }
            (phase, other) => {
                let r = format!("peer {} sent an unexpected {} frame in state {phase:?}", self.cfg.peer, other.name());
                self.close(conn, &r, RETRY_LATER_MS);
            }
        }
    }

    fn check_peer_write(&self, offset: u64, len: u64) -> Option<String> {
        if self.role == Role::Primary {
            return Some(format!("peer {} sent a write to this primary", self.cfg.peer));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.size()) || len == 0 {
            return Some(format!("peer {} sent a write outside the volume ({len} bytes at {offset})", self.cfg.peer));
        }
        None
    }

    fn on_peer_state(&mut self, conn: ConnId, role: WireRole, disk: WireDisk) {
        let Some(link) = self.link.as_mut() else { return };
        link.peer_role = role;
        link.peer_disk = disk;
        if role == WireRole::Primary && self.role == Role::Primary {
            let reason = format!("peer {} became primary while this replica is primary", self.cfg.peer);
            self.split_brain = Some(reason.clone());
            self.event(ReplicaEvent::SplitBrain { reason: reason.clone() });
            self.close(conn, &reason, RETRY_LATER_MS);
        }
    }

    fn on_hello(&mut self, conn: ConnId, peer: Hello) {
        let Some(local) = self.link.as_ref().map(|l| l.local_hello.clone()) else { return };
        match self.check_peer_version(&local, &peer) {
            VersionCheck::Agreed => {}
            VersionCheck::Unknown(reason) => {
                // As the previous release's decoder would: no goodbye, which is what tells
                // the peer to step down.
                self.refused = Some(reason.clone());
                self.event(ReplicaEvent::PeerRefused { reason: reason.clone() });
                self.drop_link(&reason);
                self.emit(Output::Close { conn, reason, retry_after_ms: RETRY_LATER_MS });
                return;
            }
            VersionCheck::Mismatch(reason) => {
                self.refused = Some(reason.clone());
                self.event(ReplicaEvent::PeerRefused { reason: reason.clone() });
                self.close(conn, &reason, RETRY_LATER_MS);
                return;
            }
            VersionCheck::Outpaced => {
                if let Some(link) = self.link.as_mut() {
                    link.outpaced = true;
                    link.peer = Some(peer);
                }
                return;
            }
            VersionCheck::Renegotiate(version) => {
                let r = format!("peer {} speaks replication protocol version {version}: renegotiating", self.cfg.peer);
                self.close(conn, &r, RETRY_SOON_MS);
                return;
            }
        }
        if let Err(reason) = handshake::check_peer(&local, &peer, &self.cfg.peer) {
            self.refused = Some(reason.clone());
            self.event(ReplicaEvent::PeerRefused { reason: reason.clone() });
            self.close(conn, &reason, RETRY_LATER_MS);
            return;
        }
        if let Some(link) = self.link.as_mut() {
            link.peer_role = peer.role;
            link.peer_disk = peer.disk;
            link.peer = Some(peer.clone());
        }
        let decision = handshake::decide(&local, &peer);
        // A resolution is spent by the handshake that sees it.
        self.resolution = None;
        self.refused = None;
        match decision {
            Decision::InSync => {
                self.split_brain = None;
                self.set_phase(Phase::Ready);
                self.event(ReplicaEvent::Connected { peer: self.cfg.peer.clone() });
                for flag in [flags::CRASHED_PRIMARY, flags::SUPERSEDED] {
                    if self.sb.has(flag) {
                        self.sb.set_flag(flag, false);
                        self.sb_dirty = true;
                    }
                }
            }
            Decision::InitialSkip { current } => {
                self.split_brain = None;
                let gens = crate::replication::generation::Generations { current, bitmap: 0, history: [0, 0] };
                self.sb.gens = gens;
                if let Some(p) = self.link.as_mut().and_then(|l| l.peer.as_mut()) {
                    p.gens = gens;
                }
                self.set_disk(StoredDisk::UpToDate, "both replicas are new and all zeroes: identical without a sync");
                self.persist(None, false);
                self.set_phase(Phase::Ready);
                if let Some(link) = self.link.as_mut() {
                    // The peer reaches the same verdict and is up to date as well.
                    link.peer_disk = WireDisk::UpToDate;
                }
                self.event(ReplicaEvent::Connected { peer: self.cfg.peer.clone() });
            }
            Decision::Resync { local_is_source, full, reason } => {
                self.split_brain = None;
                self.event(ReplicaEvent::Connected { peer: self.cfg.peer.clone() });
                let resolved_by = reason.discards().map(str::to_string);
                self.begin_sync(conn, local_is_source, full, reason, resolved_by);
            }
            Decision::WaitForForce { reason } => {
                self.set_phase(Phase::Waiting);
                self.event(ReplicaEvent::PeerRefused { reason });
            }
            Decision::SplitBrain { reason } => {
                self.split_brain = Some(reason.clone());
                self.event(ReplicaEvent::SplitBrain { reason: reason.clone() });
                self.close(conn, &format!("split brain: {reason}"), RETRY_LATER_MS);
            }
            Decision::Refuse { reason } => {
                self.refused = Some(reason.clone());
                self.event(ReplicaEvent::PeerRefused { reason: reason.clone() });
                self.close(conn, &reason, RETRY_LATER_MS);
            }
        }
    }

    /// Learns which versions the peer speaks from its hello, and says whether this
    /// connection can be decided on: both hellos must be in the version both speak.
    fn check_peer_version(&mut self, local: &Hello, peer: &Hello) -> VersionCheck {
        let ours = self.cfg.speaks;
        let unspoken = || {
            format!(
                "peer {} sent a version {} handshake; this replica speaks replication protocol versions {} to {}",
                self.cfg.peer, peer.version, ours.min, ours.max
            )
        };
        if peer.version > u32::from(ours.max) {
            // The previous release's decoder refuses such a hello, so a replica told to
            // speak only that version refuses it too.
            return VersionCheck::Unknown(unspoken());
        }
        if peer.version < u32::from(ours.min) {
            return VersionCheck::Mismatch(unspoken());
        }
        if peer.version < local.version {
            return VersionCheck::Outpaced;
        }
        // Only a newer hello announces a range; an older one may be careful rather than old.
        self.peer_speaks = Some(peer.speaks);
        match crate::protocol::negotiate(ours, peer.speaks) {
            Err(e) => VersionCheck::Mismatch(format!("peer {}: replication protocol: {e}", self.cfg.peer)),
            Ok(v) if u32::from(v) > local.version => VersionCheck::Renegotiate(v),
            Ok(_) => VersionCheck::Agreed,
        }
    }

    pub(super) fn set_phase(&mut self, phase: Phase) {
        if let Some(link) = self.link.as_mut() {
            link.phase = phase;
        }
    }

    pub(super) fn wire_role(&self) -> WireRole {
        match self.role {
            Role::Primary => WireRole::Primary,
            Role::Secondary => WireRole::Secondary,
        }
    }
}
