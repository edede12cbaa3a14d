//! What `cluster_import` needs of etcd beyond a change: every key of the policy as it is,
//! raw, to tell an empty prefix (or one an earlier run of the same import left part-way)
//! from a fleet that already has a policy.

use super::{Cluster, WRITE_TIMEOUT, read_range, unavailable};
use crate::service::Failure;

/// Keys and their values, as etcd holds them.
pub type RawKeys = Vec<(String, Vec<u8>)>;

impl Cluster {
    /// Every key and value in the policy's range at one revision, and that revision.
    pub fn policy_keys(&self) -> Result<(i64, RawKeys), Failure> {
        let Some(client) = self.client.lock().expect("client lock").clone() else {
            return Err(unavailable("this node has not reached etcd since it started"));
        };
        let (start, end) = self.keys.policy_range();
        let read = async {
            let mut keys = Vec::new();
            let revision = read_range(&client, start, end, 0, |kv| {
                keys.push((String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec()));
            })
            .await?;
            Ok::<_, etcd_client::Error>((revision, keys))
        };
        match self.runtime.block_on(async { tokio::time::timeout(WRITE_TIMEOUT * 4, read).await }) {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(unavailable(&format!("reading the prefix: {e}"))),
            Err(_) => Err(unavailable("etcd did not answer while the prefix was read")),
        }
    }
}
