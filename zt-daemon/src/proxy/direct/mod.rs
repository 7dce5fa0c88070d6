//! Same-node connections that skip the agent (`mtls.same_node = "direct"`). `same_node` grants
//! the path once policy allowed a first connection; the kernel then records each direct
//! connection and reports its open and close (`capture::DirectPaths`). This task turns the
//! reports into the usual access records and TCP metrics (`node_local`, `same_node = direct`),
//! and whenever policy, trust or the node's pods change, starts a new grant epoch (nothing new
//! gets past the agent on an old decision) and decides every open direct connection again: one
//! now denied, whose certificates were revoked or whose pod left is aborted at its source (the
//! destination gets a reset), as a spliced one is closed.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Instant, SystemTime},
};

use tracing::{debug, error, info, warn};
use zt_common::DIRECT_FLOWS_MAX;

use self::followed::{
    Followed, Open, RECONCILE_EVERY, at_source, follow_enrollments, forget_gone, key, mark_aborted,
    permits, reconcile,
};
use super::{
    AccessRecord, Direction, NodeLocal, ProxyContext, access::Identities, authorize, log_access,
    same_node::Ends,
};
use crate::{
    capture::{DirectConnection, DirectPaths, DirectReport},
    copy::{CloseReason, RelayOutcome},
    enrollment::LocalWorkload,
    policy::{Peer, PolicyDecision, WorkloadRef},
};

mod followed;
mod idle;

/// Starts following the direct connections (once, after the first enrollment). Aborting one
/// needs the kernel's SOCK_DESTROY: without it nothing is granted, as nothing could be revoked.
pub fn follow_direct_connections(ctx: &Arc<ProxyContext>, paths: &DirectPaths) {
    let (ctx, paths) = (ctx.clone(), paths.clone());
    tokio::spawn(async move {
        let check =
            tokio::task::spawn_blocking(crate::enrollment::sock_diag::check_abort_works).await;
        if let Err(e) = check.map_err(std::io::Error::other).and_then(|r| r) {
            error!(error = %e, "direct connections: the kernel cannot abort a socket (SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY); none is granted, same-node connections are spliced");
            paths.disable();
        }
        watch_direct_connections(ctx, paths).await;
    });
}

/// Follows the direct connections for as long as the agent runs (spawned once, after the
/// first enrollment, so that connections a previous agent let through find their pods), in
/// every mode: an agent that grants nothing still decides the direct connections a previous
/// one left open. If it stops following (a failure, a panic), it stops every grant: no
/// connection skips the agent unless it is followed. The agent's own exit is not such a stop:
/// its successor, which shares the maps, follows them.
async fn watch_direct_connections(ctx: Arc<ProxyContext>, paths: DirectPaths) {
    struct DisableOnPanic(DirectPaths);
    impl Drop for DisableOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                stopped(&self.0);
            }
        }
    }
    let _guard = DisableOnPanic(paths.clone());
    follow(&ctx, &paths).await;
    stopped(&paths);
}

fn stopped(paths: &DirectPaths) {
    error!(
        "direct connections: no longer followed; every same-node connection goes through the agent"
    );
    paths.disable();
}

async fn follow(ctx: &Arc<ProxyContext>, paths: &DirectPaths) -> Option<()> {
    let tunnel = ctx.tunnel.as_ref()?;
    let mut reports = paths.reports()?;
    let mut policy = ctx.policy.subscribe();
    let mut trust = tunnel.trust.subscribe();
    // Connections a previous agent let through are decided again under this one's policy.
    let mut followed = recheck(ctx, paths, Followed::default()).await?;
    let mut reports_since_count = 0usize;
    let mut crowded = check_room(paths).await? >= CROWDED;
    let mut reconcile_timer = tokio::time::interval(RECONCILE_EVERY);
    reconcile_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle_timer = tokio::time::interval(idle::check_every(ctx.idle_timeout));
    idle_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = reconcile_timer.tick() => reconcile(paths, &mut followed).await?,
            _ = idle_timer.tick() => idle::abort_idle(&mut followed, ctx.idle_timeout).await,
            batch = reports.next_batch() => {
                let batch = batch?;
                reports_since_count += batch.len();
                let mut aborts = Vec::new();
                for report in batch {
                    on_report(ctx, report, &mut followed, &mut aborts);
                }
                if !aborts.is_empty() {
                    // Netlink, off the runtime: one task for the batch, however many a pod
                    // opened beyond its limit.
                    tokio::task::spawn_blocking(move || {
                        for (c, source) in aborts {
                            abort(&c, &source);
                        }
                    });
                }
                // Counting the map walks it: now and then, more often once it holds many.
                let every = if crowded { 256 } else { 4096 };
                if reports_since_count >= every {
                    reports_since_count = 0;
                    crowded = check_room(paths).await? >= CROWDED;
                }
            }
            changed = policy.changed() => {
                changed.ok()?;
                followed = recheck(ctx, paths, followed).await?;
            }
            changed = trust.changed() => {
                changed.ok()?;
                followed = recheck(ctx, paths, followed).await?;
            }
            () = paths.workloads_change() => {
                followed = recheck(ctx, paths, followed).await?;
            }
        }
    }
}

/// [`DirectPaths::check_room`] off the runtime (it walks the kernel's map).
async fn check_room(paths: &DirectPaths) -> Option<usize> {
    let paths = paths.clone();
    tokio::task::spawn_blocking(move || paths.check_room())
        .await
        .ok()
}

/// From this many open direct connections on, the kernel's map is counted more often.
const CROWDED: usize = DIRECT_FLOWS_MAX as usize / 2;

/// The enrolled workload of the pod with this netns cookie.
fn enrolled(ctx: &ProxyContext, netns_cookie: u64) -> Option<Arc<LocalWorkload>> {
    ctx.directory
        .node()
        .enrolled
        .iter()
        .find(|w| w.netns_cookie == netns_cookie)
        .cloned()
}

/// Both pods of a connection, while they are enrolled.
fn pods(
    ctx: &ProxyContext,
    c: &DirectConnection,
) -> Option<(Arc<LocalWorkload>, Arc<LocalWorkload>)> {
    Some((
        enrolled(ctx, c.source_netns)?,
        enrolled(ctx, c.destination_netns)?,
    ))
}

/// The two access records (source side, then destination side) of connection `c` between pods
/// of `identities`, deciding it again (for `source_ip`, the source pod's own address) unless
/// `decided` is given.
fn records<'a>(
    ctx: &ProxyContext,
    c: &DirectConnection,
    (identities, source_ip): (&Identities, Option<IpAddr>),
    source: &'a LocalWorkload,
    destination: &'a LocalWorkload,
    decided: Option<(Option<PolicyDecision>, Instant)>,
) -> (AccessRecord<'a>, AccessRecord<'a>) {
    let (from, to) = (c.source, c.destination);
    let started = decided.as_ref().map_or_else(Instant::now, |(_, s)| *s);
    let outbound = AccessRecord {
        direction: Direction::Outbound,
        workload: source,
        peer: from,
        original_dst: to,
        service: None,
        upstream: None,
        identities: identities.clone(),
        peer_workload: Some(destination.id.clone()),
        decision: None,
        sent_with_connect: 0,
        node_local: Some(NodeLocal::Direct),
        started,
    };
    let inbound = match decided {
        Some((decision, started)) => AccessRecord {
            direction: Direction::Inbound,
            workload: destination,
            peer: from,
            original_dst: to,
            service: None,
            upstream: None,
            identities: identities.clone(),
            peer_workload: Some(source.id.clone()),
            decision,
            sent_with_connect: 0,
            node_local: Some(NodeLocal::Direct),
            started,
        },
        None => {
            let peer = SocketAddr::new(source_ip.unwrap_or(from.ip()), from.port());
            let (record, _) = authorize(
                ctx,
                destination,
                peer,
                to,
                identities.clone(),
                Some(source.id.clone()),
                started,
            );
            AccessRecord {
                node_local: Some(NodeLocal::Direct),
                ..record
            }
        }
    };
    (outbound, inbound)
}

/// Follows one report; a connection to abort is added to `aborts`.
fn on_report(
    ctx: &ProxyContext,
    report: DirectReport,
    followed: &mut Followed,
    aborts: &mut Vec<(DirectConnection, Arc<LocalWorkload>)>,
) {
    match report {
        DirectReport::Opened(c) => {
            if followed.open.contains_key(&key(&c)) {
                // A re-check adopted it before its report came: counted then.
                return;
            }
            let Some((source, destination)) = pods(ctx, &c) else {
                debug!(source = %c.source, destination = %c.destination, "direct connection opened between pods no longer enrolled");
                return;
            };
            let Some(ends) = Ends::between(&source, destination.clone(), c.destination) else {
                return;
            };
            let identities = ends.identities();
            let who = (&identities, ends.source_ip());
            let (outbound, inbound) = records(ctx, &c, who, &source, &destination, None);
            // Granted under a decision a change has since reversed, before the re-check
            // reached it.
            let mut aborted = (!inbound.is_allowed()).then_some(CloseReason::Policy);
            let permits = match aborted {
                Some(_) => None,
                None => permits(&source, &destination),
            };
            if aborted.is_none() && permits.is_none() {
                // The kernel let it open; the agent's path would have refused it.
                beyond_limit(ctx, &c, &source, &destination);
                aborted = Some(CloseReason::MaxConnections);
            }
            if aborted.is_some() {
                aborts.push((c, source.clone()));
            }
            outbound.count(&ctx.metrics, None);
            inbound.count(&ctx.metrics, None);
            let entry = Open {
                connection: c,
                identities: identities.clone(),
                decision: inbound.decision.clone(),
                started: inbound.started,
                aborted,
                permits,
                source: source.clone(),
                destination: destination.clone(),
            };
            followed.open.insert(key(&c), entry);
        }
        DirectReport::Closed {
            connection: c,
            sent,
            received,
        } => {
            let known = followed
                .open
                .remove(&key(&c))
                .or_else(|| followed.forgotten.remove(&key(&c)).map(|(o, _)| o));
            let counted = known.is_some();
            let close = known
                .as_ref()
                .and_then(|o| o.aborted)
                .unwrap_or(CloseReason::Eof);
            let outcome = RelayOutcome {
                sent,
                received,
                close,
            };
            log_closed(ctx, &c, known, counted, &outcome);
        }
        DirectReport::Failed(c) => {
            // One a re-check adopted while it connected was counted open.
            let known = followed.open.remove(&key(&c));
            let counted = known.is_some();
            let outcome = RelayOutcome::refused(CloseReason::ConnectFailed);
            for_records(ctx, &c, known, |outbound, inbound| {
                for record in [outbound, inbound] {
                    if counted {
                        record.count(&ctx.metrics, Some(&outcome));
                    }
                    log_access(record, &outcome);
                }
            });
        }
    }
}

/// Counts and logs a closed connection; one the agent did not count open (it opened under a
/// previous agent and closed before a re-check adopted it) is counted as opened too, so that
/// opened minus closed stays what is open.
fn log_closed(
    ctx: &ProxyContext,
    c: &DirectConnection,
    known: Option<Open>,
    counted: bool,
    outcome: &RelayOutcome,
) {
    for_records(ctx, c, known, |outbound, inbound| {
        for record in [outbound, inbound] {
            if !counted {
                record.count(&ctx.metrics, None);
            }
            record.count(&ctx.metrics, Some(outcome));
            log_access(record, outcome);
        }
    });
}

/// Runs `f` on the connection's two records, from what was kept when it opened or else from
/// the pods as they are now.
fn for_records(
    ctx: &ProxyContext,
    c: &DirectConnection,
    known: Option<Open>,
    f: impl FnOnce(&AccessRecord<'_>, &AccessRecord<'_>),
) {
    if let Some(o) = known {
        let decided = Some((o.decision, o.started));
        let who = (&o.identities, None);
        let (outbound, inbound) = records(ctx, c, who, &o.source, &o.destination, decided);
        return f(&outbound, &inbound);
    }
    let Some((source, destination)) = pods(ctx, c) else {
        debug!(source = %c.source, destination = %c.destination, "direct connection closed between pods no longer enrolled");
        return;
    };
    let Some(ends) = Ends::between(&source, destination.clone(), c.destination) else {
        return;
    };
    let (identities, source_ip) = (ends.identities(), ends.source_ip());
    let (outbound, inbound) = records(
        ctx,
        c,
        (&identities, source_ip),
        &source,
        &destination,
        None,
    );
    f(&outbound, &inbound);
}

/// A new epoch, and every open direct connection decided again: aborted when no longer
/// allowed. It walks the kernel's map and may abort many sockets, so it runs on a blocking
/// thread; `None` if it failed.
async fn recheck(
    ctx: &Arc<ProxyContext>,
    paths: &DirectPaths,
    followed: Followed,
) -> Option<Followed> {
    let (ctx, paths) = (ctx.clone(), paths.clone());
    let task = tokio::task::spawn_blocking(move || {
        let mut followed = followed;
        recheck_now(&ctx, &paths, &mut followed).then_some(followed)
    });
    task.await
        .inspect_err(|e| error!(error = %e, "direct connections: the re-check failed"))
        .ok()
        .flatten()
}

/// Returns false if the grants could not be voided.
fn recheck_now(ctx: &ProxyContext, paths: &DirectPaths, followed: &mut Followed) -> bool {
    if let Err(e) = paths.new_epoch() {
        error!(error = %e, "direct connections: cannot start a new grant epoch");
        return false;
    }
    let Some(tunnel) = &ctx.tunnel else {
        return true;
    };
    let trust = tunnel.trust.current();
    let (connections, complete) = paths.connections();
    if !complete {
        warn!(
            "direct connections: the kernel's records changed faster than the re-check could walk them; some were not decided again"
        );
    }
    age_forgotten(ctx, followed);
    if complete {
        forget_gone(followed, &connections, Instant::now());
    }
    // Until the first list of pods, a pod not enrolled yet may still come.
    let pods_known = !ctx.directory.node().discovery_pending;
    let mut moved = 0usize;
    for c in connections {
        let known = followed.open.get(&key(&c));
        let (source, destination) = match pods(ctx, &c) {
            Some(pods) => pods,
            None if !pods_known => continue,
            None => {
                // A pod left the mesh: nothing vouches for the connection any more. It is
                // aborted from its source's namespace, which the agent may still hold.
                let source = enrolled(ctx, c.source_netns).or(known.map(|o| o.source.clone()));
                match source {
                    Some(source) => {
                        abort(&c, &source);
                    }
                    None => {
                        warn!(source = %c.source, destination = %c.destination, "direct connection of a pod no longer enrolled: its namespace is out of reach, it stays open")
                    }
                }
                mark_aborted(followed, &c, CloseReason::Policy);
                continue;
            }
        };
        let Some(ends) = Ends::between(&source, destination.clone(), c.destination) else {
            warn!(source = %c.source, destination = %c.destination, "direct connection aborted: a pod has no certificate");
            abort(&c, &source);
            mark_aborted(followed, &c, CloseReason::Policy);
            continue;
        };
        let decision = match ends.certificates().check(&trust, SystemTime::now()) {
            Err(why) if why.closes_now() => {
                warn!(source = %c.source, destination = %c.destination, reason = %why, "direct connection aborted: {why}");
                None
            }
            _ => still_allowed(ctx, &c, &ends, &destination),
        };
        match decision {
            None => {
                abort(&c, &source);
                mark_aborted(followed, &c, CloseReason::Policy);
            }
            Some(decision) if !followed.open.contains_key(&key(&c)) => {
                adopt(ctx, followed, &c, &ends, (&source, &destination), decision);
            }
            Some(_) => {
                if follow_enrollments(followed, &c, &source, &destination) {
                    moved += 1;
                }
            }
        }
    }
    if moved > 0 {
        info!(
            moved,
            "direct connections moved to their pods' new enrollments, with their places"
        );
    }
    followed.rechecked = true;
    true
}

/// Logs and counts a direct connection aborted for opening beyond a pod's connection limit.
fn beyond_limit(
    ctx: &ProxyContext,
    c: &DirectConnection,
    source: &LocalWorkload,
    destination: &LocalWorkload,
) {
    ctx.metrics
        .outbound_refused(CloseReason::MaxConnections.as_str());
    warn!(source = %c.source, destination = %c.destination, source_workload = %source.id, destination_workload = %destination.id, "direct connection aborted: a pod is at max_connections_per_workload");
}

/// Follows an allowed connection the agent did not see open (a previous agent let it through,
/// or its report is late or lost): counted open now, so that the dashboards show it open, with
/// a place under both pods' limits. A previous agent's connection without one is kept (an
/// upgrade aborts nothing); any other is aborted, as its report would have had it.
fn adopt(
    ctx: &ProxyContext,
    followed: &mut Followed,
    c: &DirectConnection,
    ends: &Ends<'_>,
    (source, destination): (&Arc<LocalWorkload>, &Arc<LocalWorkload>),
    decision: PolicyDecision,
) {
    let started = Instant::now();
    let decided = Some((Some(decision.clone()), started));
    let identities = ends.identities();
    let who = (&identities, ends.source_ip());
    let (outbound, inbound) = records(ctx, c, who, source, destination, decided);
    outbound.count(&ctx.metrics, None);
    inbound.count(&ctx.metrics, None);
    let permits = permits(source, destination);
    let aborted = (permits.is_none() && followed.rechecked).then(|| {
        beyond_limit(ctx, c, source, destination);
        abort(c, source);
        CloseReason::MaxConnections
    });
    followed.open.insert(
        key(c),
        Open {
            connection: *c,
            identities,
            source: source.clone(),
            destination: destination.clone(),
            decision: Some(decision),
            started,
            aborted,
            permits,
        },
    );
}

/// The decision that still allows an open connection, or None; a denial is counted and logged
/// as an update that closes a connection is.
fn still_allowed(
    ctx: &ProxyContext,
    c: &DirectConnection,
    ends: &Ends<'_>,
    destination: &LocalWorkload,
) -> Option<PolicyDecision> {
    let peer = Peer {
        identity: ends.identities().source,
        ip: ends.source_ip().unwrap_or(c.source.ip()).to_canonical(),
    };
    let current = destination.current();
    let target = WorkloadRef::from(&*current);
    let decision =
        ctx.policy
            .subscribe()
            .borrow()
            .decide(&target, &peer, c.destination.port(), true);
    if decision.is_allowed() {
        return Some(decision);
    }
    ctx.metrics.count_decision(&decision);
    warn!(
        workload = %destination.id,
        source = %c.source,
        rule = %decision.rule_ref(),
        close = "policy",
        "open direct connection closed by a policy update: {decision}"
    );
    None
}

/// Aborts a direct connection at its source socket (by its cookie, so nothing else is hit);
/// the source's kernel resets the destination's side. The programs then report its close.
/// Whether it destroyed the socket (not when it was already gone).
fn abort(c: &DirectConnection, source: &LocalWorkload) -> bool {
    match source.abort_connection(&at_source(c)) {
        Ok(()) => true,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ESTALE) =>
        {
            false
        }
        Err(e) => {
            error!(workload = %source.id, source = %c.source, destination = %c.destination, error = %e, "cannot abort a direct connection");
            false
        }
    }
}

/// Counts as closed the connections forgotten two re-checks ago: their pods are not kept for
/// ever.
fn age_forgotten(ctx: &ProxyContext, followed: &mut Followed) {
    followed.forgotten.retain(|_, (o, age)| {
        *age += 1;
        if *age < 2 {
            return true;
        }
        let decided = Some((o.decision.clone(), o.started));
        let who = (&o.identities, None);
        let (outbound, inbound) =
            records(ctx, &o.connection, who, &o.source, &o.destination, decided);
        let lost = RelayOutcome::refused(o.aborted.unwrap_or(CloseReason::Eof));
        for record in [&outbound, &inbound] {
            record.count(&ctx.metrics, Some(&lost));
        }
        false
    });
}
