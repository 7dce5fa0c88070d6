//! The inbound decision: the policies in force asked about one connection, and a future that
//! closes it if a later policy update denies it.
use std::{future::Future, net::SocketAddr, time::Instant};

use tracing::warn;

use super::{AccessRecord, Direction, Identities, ProxyContext, access::id_or_dash};
use crate::copy;
use crate::{
    enrollment::LocalWorkload,
    policy::{self, Peer, WorkloadRef},
    workload::WorkloadId,
};

/// Authorizes an inbound connection from `peer` (with `identities.source` when it came through
/// the tunnel) to `original_dst` on `workload`, under the policies in force, and returns its
/// access record. When allowed, the returned future resolves (close reason `policy`) if a later
/// policy update, or a change of the workload's labels, denies it; when denied, the decision is logged with the policy and rule.
pub(crate) fn authorize<'a>(
    ctx: &ProxyContext,
    workload: &'a LocalWorkload,
    peer_addr: SocketAddr,
    original_dst: SocketAddr,
    identities: Identities,
    peer_workload: Option<WorkloadId>,
    started: Instant,
) -> (
    AccessRecord<'a>,
    impl Future<Output = copy::CloseReason> + 'a,
) {
    let mtls = identities.source.is_some();
    let peer = Peer {
        identity: identities.source.clone(),
        ip: peer_addr.ip().to_canonical(),
    };
    let port = original_dst.port();
    let mut updates = ctx.policy.subscribe();
    let mut changes = workload.changes();
    let decision = updates.borrow_and_update().decide(
        &WorkloadRef::from(&**changes.borrow_and_update()),
        &peer,
        port,
        mtls,
    );
    ctx.metrics.count_decision(&decision);
    if !decision.is_allowed() {
        warn!(
            workload = %workload.id,
            source_identity = %id_or_dash(peer.identity.as_ref()),
            peer = %peer.ip,
            port,
            action = %decision.action,
            reason = decision.reason.as_str(),
            rule = %decision.rule_ref(),
            "connection denied: {decision}"
        );
    }
    let metrics = ctx.metrics.clone();
    let revoked = async move {
        let decision = policy::denied_by_update(updates, changes, &peer, port, mtls).await;
        metrics.count_decision(&decision);
        warn!(
            workload = %workload.id,
            source_identity = %id_or_dash(peer.identity.as_ref()),
            peer = %peer.ip,
            port,
            rule = %decision.rule_ref(),
            close = "policy",
            "open connection closed by a policy update: {decision}"
        );
        copy::CloseReason::Policy
    };
    let record = AccessRecord {
        direction: Direction::Inbound,
        workload,
        peer: peer_addr,
        original_dst,
        service: None,
        upstream: None,
        identities,
        peer_workload,
        decision: Some(decision),
        sent_with_connect: 0,
        node_local: None,
        started,
    };
    (record, revoked)
}
