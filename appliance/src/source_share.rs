//! A source address's share of a listener's few slots (TLS handshakes in
//! progress, side-listener connections). Slots are taken before a client
//! has proved anything, so without a share one host could hold all of them
//! with silent sockets: 200 such sockets, reopened as they were closed,
//! made every other client's new connection wait 9.5 s, with no
//! certificate needed. Once more than half of the slots are taken, a
//! source that already holds `per_source` of them is refused at once;
//! below that, one busy host (a load balancer, a batch job opening its
//! connections) is not held back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Slots in use per source address.
#[derive(Debug)]
pub struct SourceShare {
    held: Mutex<HashMap<IpAddr, usize>>,
    per_source: usize,
}

impl SourceShare {
    /// A share of at most `per_source` slots per address while contended.
    pub fn new(per_source: usize) -> Arc<SourceShare> {
        Arc::new(SourceShare {
            held: Mutex::new(HashMap::new()),
            per_source: per_source.max(1),
        })
    }

    /// A slot for `source`, or None when `contended` (more than half of
    /// the listener's slots are taken) and `source` holds its share.
    pub fn take(self: &Arc<Self>, source: IpAddr, contended: bool) -> Option<SourceSlot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(source).or_insert(0);
        if contended && *n >= self.per_source {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            share: self.clone(),
            source,
        })
    }

    /// Slots `source` holds now.
    pub fn held_by(&self, source: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&source).copied().unwrap_or(0)
    }
}

/// One slot of a source; given back on drop.
#[derive(Debug)]
pub struct SourceSlot {
    share: Arc<SourceShare>,
    source: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.share.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.source) {
            *n -= 1;
            // The map holds only sources with slots: a scan of many
            // addresses leaves nothing behind.
            if *n == 0 {
                held.remove(&self.source);
            }
        }
    }
}

/// Whether a listener with `total` slots, `available` of them free, is
/// contended: more than half taken.
pub fn contended(total: usize, available: usize) -> bool {
    total.saturating_sub(available) > total / 2
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_source_is_held_to_its_share_only_while_slots_are_contended() {
        let share = SourceShare::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let mut a_slots: Vec<_> = (0..5).map(|_| share.take(a, false).unwrap()).collect();
        assert_eq!(share.held_by(a), 5);
        assert!(share.take(a, true).is_none());
        let b1 = share.take(b, true).unwrap();
        let _b2 = share.take(b, true).unwrap();
        assert!(share.take(b, true).is_none());
        a_slots.truncate(1);
        assert_eq!(share.held_by(a), 1);
        let _a2 = share.take(a, true).unwrap();
        drop((a_slots, _a2, b1, _b2));
        assert!(share.held.lock().unwrap().is_empty(), "nothing left behind");
        assert!(!contended(64, 32) && contended(64, 31));
        assert!(!contended(1, 1) && contended(1, 0));
    }
}
