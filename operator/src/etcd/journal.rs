//! The witness's memory in etcd: one [`LeaseRecord`] per group, written in a transaction
//! fenced by the leader's revision after each decision that grants or releases, and
//! before the answer is sent.
//!
//! Why that is enough for a successor to honour every grant: a grant is answered only
//! after its record committed, and it committed only while the leader key was still the
//! writer's. The successor's leader key is created after that one is gone, and it reads
//! the records after that, so it sees every grant that was ever answered. It then holds
//! each recorded holder's lease for the grant's stretched ttl from its own takeover, which
//! ends later in real time than the holder's lease does ([`crate::witness::Witness::resume`]).

use etcd_client::{Client, TxnOp};
use hapair_crds::nodeapi::GroupKey;

use super::{EtcdError, Fence, Keys, decode, encode, fenced_write, get_prefix};
use crate::witness::LeaseRecord;
use crate::witness::lease::LeaseJournal;

/// Writes a term's witness records.
#[derive(Clone)]
pub struct EtcdJournal {
    client: Client,
    keys: Keys,
    fence: Fence,
}

impl std::fmt::Debug for EtcdJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The etcd client has no Debug of its own.
        f.debug_struct("EtcdJournal").field("keys", &self.keys).field("fence", &self.fence).finish_non_exhaustive()
    }
}

impl EtcdJournal {
    pub fn new(client: Client, keys: Keys, fence: Fence) -> Self {
        EtcdJournal { client, keys, fence }
    }
}

impl LeaseJournal for EtcdJournal {
    fn write<'a>(
        &'a self,
        group: &'a GroupKey,
        record: &'a LeaseRecord,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let op = TxnOp::put(self.keys.witness(group), encode(record), None);
            fenced_write(&self.client, &self.keys, self.fence, "recording a witness decision", vec![op])
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Every group's record, for the successor's [`crate::witness::Witness::resume`].
pub async fn load_records(client: &Client, keys: &Keys) -> Result<Vec<(GroupKey, LeaseRecord)>, EtcdError> {
    let prefix = keys.all_witness();
    let mut records = Vec::new();
    for kv in get_prefix(client, &prefix).await? {
        if let Some(group) = Keys::group_of(kv.key(), &prefix) {
            records.push((group, decode::<LeaseRecord>(&kv)?));
        }
    }
    Ok(records)
}
