//! Finished disk operations, routed by their tag back to the request, frame or step that asked.

use bytes::Bytes;

use super::Phase;
use super::Role;
use super::messages::{ErrorCode, IoOutput, IoTag, MetaPurpose, ReplicaEvent, refusal};
use super::{Machine, RETRY_LATER_MS};
use crate::replication::metadata::StoredDisk;
use crate::replication::wire::{Frame, MAX_DATA};

impl Machine {
    pub(super) fn on_io_done(&mut self, tag: IoTag, result: Result<IoOutput, String>) {
        match tag {
            IoTag::App(req) => {
                if let Err(e) = &result {
                    self.event(ReplicaEvent::IoError { operation: "write".into(), message: e.clone() });
                }
                if let Some(r) = self.requests.get_mut(&req) {
                    r.local_done = true;
                    if let Err(e) = result {
                        r.error = Some(refusal(ErrorCode::Io, e));
                    }
                }
                self.maybe_finish(req);
            }
            IoTag::AppFlush(req) => {
                if let Some(r) = self.requests.get_mut(&req) {
                    r.local_done = true;
                    if let Err(e) = result {
                        r.error = Some(refusal(ErrorCode::Io, e));
                    }
                }
                self.maybe_finish(req);
            }
            IoTag::PeerWrite { conn, seq } => {
                let ok = result.is_ok();
                if let Err(e) = result {
                    self.event(ReplicaEvent::IoError { operation: "replicated write".into(), message: e });
                    self.set_disk(StoredDisk::Inconsistent, "a replicated write failed");
                }
                if self.conn() == Some(conn) {
                    self.send(conn, Frame::Ack { seq, ok });
                }
            }
            IoTag::PeerFlush { conn, seq } => {
                if self.conn() == Some(conn) {
                    self.send(conn, Frame::FlushAck { seq, ok: result.is_ok() });
                }
            }
            IoTag::ResyncRead { conn, range } => {
                if let Some(i) = self.reads.iter().position(|r| *r == range) {
                    self.reads.swap_remove(i);
                }
                if self.conn() != Some(conn) {
                    return;
                }
                match result {
                    Ok(IoOutput::Data(data)) => {
                        let offset = range.byte_offset();
                        let frame = if data.iter().all(|&b| b == 0) {
                            Frame::ResyncReply { offset, data: Bytes::new(), zero_len: data.len() as u32 }
                        } else {
                            Frame::ResyncReply { offset, data, zero_len: 0 }
                        };
                        self.send(conn, frame);
                    }
                    Ok(_) | Err(_) => {
                        let reason = format!("could not read resync data at offset {}", range.byte_offset());
                        self.event(ReplicaEvent::IoError { operation: "resync read".into(), message: reason.clone() });
                        self.close(conn, &reason, RETRY_LATER_MS);
                    }
                }
            }
            IoTag::ResyncWrite { conn, range } => {
                if self.conn() != Some(conn) {
                    return;
                }
                if let Err(e) = result {
                    self.event(ReplicaEvent::IoError { operation: "resync write".into(), message: e.clone() });
                    self.close(conn, &format!("resync write failed: {e}"), RETRY_LATER_MS);
                    return;
                }
                self.bitmap.clear_range(range);
                let now = self.now;
                if let Some(p) = self.link.as_mut().and_then(|l| l.sync.as_mut()).and_then(|s| s.planner.as_mut()) {
                    p.completed(range, now);
                }
                let len = u32::try_from(range.byte_len()).unwrap_or(MAX_DATA);
                self.send(conn, Frame::ResyncAck { offset: range.byte_offset(), len });
                self.poll_resync();
            }
            IoTag::VerifyLocal { start, range } => {
                if let Some(i) = self.reads.iter().position(|r| *r == range) {
                    self.reads.swap_remove(i);
                }
                let now = self.now;
                let Some(v) = self.verify.as_mut() else { return };
                let conn = v.conn;
                match result {
                    Ok(IoOutput::Digests(d)) => match v.planner.local(start, d, now) {
                        Ok(r) => self.mark_mismatches(conn, &r.mismatched),
                        Err(e) => self.event(ReplicaEvent::IoError { operation: "verify".into(), message: e }),
                    },
                    _ => {
                        self.verify = None;
                        self.event(ReplicaEvent::IoError {
                            operation: "verify read".into(),
                            message: format!("could not read blocks at {}", range.byte_offset()),
                        });
                        return;
                    }
                }
                self.poll_verify();
            }
            IoTag::VerifyPeer { conn, range } => {
                if self.conn() != Some(conn) {
                    return;
                }
                match result {
                    Ok(IoOutput::Digests(digests)) => {
                        self.send(conn, Frame::VerifyReply { offset: range.byte_offset(), digests })
                    }
                    _ => {
                        let reason = format!("could not read blocks at {} to verify", range.byte_offset());
                        self.close(conn, &reason, RETRY_LATER_MS);
                    }
                }
            }
            IoTag::DemoteFlush => {
                if let Some(d) = &mut self.demote {
                    d.local_flushed = true;
                }
                if let Err(e) = result {
                    self.event(ReplicaEvent::IoError { operation: "flush before demotion".into(), message: e });
                }
            }
            IoTag::Meta(purpose) => self.on_meta_done(purpose, result.map(|_| ())),
        }
    }

    fn on_meta_done(&mut self, purpose: MetaPurpose, result: Result<(), String>) {
        if let Err(e) = &result {
            self.event(ReplicaEvent::IoError { operation: "metadata update".into(), message: e.clone() });
        }
        match purpose {
            MetaPurpose::Promote(req) => match result {
                Ok(()) => self.complete(req, Ok(())),
                Err(e) => {
                    self.role = Role::Secondary;
                    self.complete(req, Err(refusal(ErrorCode::Io, format!("could not persist the promotion: {e}"))));
                }
            },
            MetaPurpose::Demote(req) => self.finish_demote(req, result),
            MetaPurpose::SyncTargetReady(conn) => {
                if self.conn() == Some(conn) {
                    if result.is_ok() {
                        self.target_ready(conn);
                    } else {
                        self.close(conn, "could not persist the resync bitmap", RETRY_LATER_MS);
                    }
                }
            }
            MetaPurpose::SyncTargetDone(conn) => {
                if self.conn() != Some(conn) || result.is_err() {
                    return;
                }
                let gens = self.sb.gens;
                let now = self.now;
                let (bytes, elapsed) = self
                    .link
                    .as_ref()
                    .and_then(|l| l.sync.as_ref())
                    .map(|s| (s.meter.done(), now.saturating_sub(s.started_ms)))
                    .unwrap_or_default();
                if let Some(link) = self.link.as_mut() {
                    link.sync = None;
                    link.phase = Phase::Ready;
                    if let Some(p) = link.peer.as_mut() {
                        p.gens = gens;
                    }
                }
                self.counters.last_sync_bytes = bytes;
                self.counters.last_sync_ms = elapsed;
                self.counters.syncs_completed += 1;
                self.send(conn, Frame::SyncDone { gens });
                self.event(ReplicaEvent::SyncFinished { source: false, bytes, elapsed_ms: elapsed });
            }
            MetaPurpose::Checkpoint(req) => {
                let r = result.map_err(|e| refusal(ErrorCode::Io, format!("could not persist metadata: {e}")));
                self.complete(req, r);
            }
            MetaPurpose::SyncSourceDone | MetaPurpose::Housekeeping => {}
            MetaPurpose::ActivityLog => {
                self.al_unsynced = self.al_unsynced.saturating_sub(1);
                if result.is_err() {
                    // The extent may not be recorded: the peer must not get what was held
                    // back. Dropping the link marks those writes out of sync here instead.
                    self.held.clear();
                    if let Some(conn) = self.conn() {
                        self.close(conn, "could not persist the activity log", RETRY_LATER_MS);
                    }
                } else if self.al_unsynced == 0 {
                    let held = std::mem::take(&mut self.held);
                    self.out.extend(held);
                }
            }
        }
    }
}
