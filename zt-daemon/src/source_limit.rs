//! A bound on what one source address may hold at once, for work done before a peer has proven
//! anything: the TLS handshakes pending on the HBONE listeners, and connections to the metrics
//! and readiness endpoints. A source at its bound is refused; other sources are not affected, so
//! one pod flooding a listener cannot starve anyone else of it.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// Counts what each source address holds; cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct SourceLimit {
    per_source: usize,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One unit a source holds, given back when dropped.
#[derive(Debug)]
pub struct SourceSlot {
    source: IpAddr,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl SourceLimit {
    pub fn new(per_source: usize) -> Self {
        Self {
            per_source,
            held: Arc::default(),
        }
    }

    /// A slot for `source`, or `None` when it already holds `per_source`.
    pub fn try_acquire(&self, source: IpAddr) -> Option<SourceSlot> {
        let source = source.to_canonical();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let count = held.entry(source).or_default();
        if *count >= self.per_source {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            source,
            held: self.held.clone(),
        })
    }

    /// Sources holding at least one slot (the map never keeps idle sources).
    pub fn sources(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_at_its_bound_is_refused_and_others_are_not() {
        let limit = SourceLimit::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = limit.try_acquire(a).unwrap();
        let _second = limit.try_acquire(a).unwrap();
        assert!(limit.try_acquire(a).is_none());
        // The same address as v4-mapped IPv6 (a dual-stack listener's view) is the same source.
        assert!(
            limit
                .try_acquire("::ffff:10.0.0.1".parse().unwrap())
                .is_none()
        );
        assert!(limit.try_acquire(b).is_some());
        drop(first);
        assert!(limit.try_acquire(a).is_some());
    }

    #[test]
    fn sources_are_forgotten_when_they_hold_nothing() {
        let limit = SourceLimit::new(1);
        let slot = limit.try_acquire("fd00::1".parse().unwrap()).unwrap();
        assert_eq!(limit.sources(), 1);
        drop(slot);
        assert_eq!(limit.sources(), 0);
    }
}
