//! The seam to cluster formation (the `clutch-cluster` crate): everything it needs comes in
//! through [`ClusterContext`], and it reports through the [`StatusSink`].

use std::path::PathBuf;

use clutch_config::{Cluster, Token};

use crate::status::StatusSink;

#[derive(Debug, Clone)]
pub struct ClusterContext {
    pub cluster: Cluster,
    pub token: Token,
    /// 32 hex digits, stable per node.
    pub node_id: String,
    pub hostname: String,
    /// Host path of `/var/lib/clutch` (the cluster code keeps its state under it).
    pub state_dir: PathBuf,
}

/// Forms (or rejoins) the cluster; called with the phase at `discovering`. Runs for as
/// long as the node should take part (the process stays alive meanwhile).
pub fn form_cluster(ctx: &ClusterContext, sink: &dyn StatusSink) -> Result<(), String> {
    let _ = sink;
    tracing::warn!(
        "cluster formation not built yet: cluster `{}` ({:?}, {} nodes expected); staying at phase=discovering",
        ctx.cluster.name,
        ctx.cluster.engine,
        ctx.cluster.expected_size
    );
    Ok(())
}
