//! The node's local stock: the first, lock-free deduction of a purchase.
//!
//! A node may sell at most its local stock. Taking a unit is one
//! compare-and-swap on an atomic counter that never goes below zero, so the
//! sold-out path costs no lock and no Redis call. A unit is only a right to
//! ask Redis for a ticket: it is given back whenever that ask does not end in
//! a new sale (Redis failed, the buyer already had a ticket, the sale is over),
//! and the guard gives it back on drop so that no path, cancellation
//! included, can strand it.

use std::sync::atomic::{AtomicU64, Ordering};

/// A counter of tickets this node may still sell.
#[derive(Debug)]
pub struct LocalStock {
    capacity: u64,
    /// Units added since the last refill, for tickets returned to the sale.
    added: AtomicU64,
    remaining: AtomicU64,
}

/// One unit of local stock taken for a purchase in progress. Dropping it gives
/// the unit back; [`Reservation::commit`] keeps it sold.
#[derive(Debug)]
#[must_use = "a reservation dropped at once gives its unit back"]
pub struct Reservation<'a> {
    stock: &'a LocalStock,
    committed: bool,
}

impl LocalStock {
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            added: AtomicU64::new(0),
            remaining: AtomicU64::new(capacity),
        }
    }

    /// Takes one unit, or `None` when none is left.
    pub fn take(&self) -> Option<Reservation<'_>> {
        // Relaxed is enough: the counter guards no other memory, and every
        // update is a single atomic read-modify-write.
        self.remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .ok()
            .map(|_| Reservation {
                stock: self,
                committed: false,
            })
    }

    /// The units not sold and not reserved.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The units taken and kept: the capacity, and the units added since,
    /// that are not left.
    pub fn sold(&self) -> u64 {
        (self.capacity + self.added.load(Ordering::Relaxed)).saturating_sub(self.remaining())
    }

    /// Adds `units`, for tickets returned to the sale: every node may then
    /// ask Redis for them, its own stock used up or not. Redis still caps
    /// the sale; this only bounds how often the node asks.
    pub fn add(&self, units: u64) {
        self.added.fetch_add(units, Ordering::Relaxed);
        self.remaining.fetch_add(units, Ordering::Relaxed);
    }

    /// Starts over with the full capacity, for a sale that was reset.
    /// Reservations still in flight give their units back on top of it; Redis
    /// still caps the sale, so that can only let this node ask Redis a few
    /// more times.
    pub fn refill(&self) {
        self.added.store(0, Ordering::Relaxed);
        self.remaining.store(self.capacity, Ordering::Relaxed);
    }

    fn give_back(&self) {
        self.remaining.fetch_add(1, Ordering::Relaxed);
    }
}

impl Reservation<'_> {
    /// Keeps the unit: the ticket was sold.
    pub fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.committed {
            self.stock.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn never_goes_below_zero() {
        let stock = LocalStock::new(2);
        stock.take().unwrap().commit();
        stock.take().unwrap().commit();
        assert!(stock.take().is_none());
        assert_eq!(stock.remaining(), 0);
    }

    #[test]
    fn a_dropped_reservation_gives_its_unit_back() {
        let stock = LocalStock::new(1);
        let reservation = stock.take().unwrap();
        assert!(stock.take().is_none());
        drop(reservation);
        assert_eq!(stock.remaining(), 1);
        stock.take().unwrap().commit();
        assert_eq!(stock.remaining(), 0);
    }

    #[test]
    fn returned_units_are_sold_on_top_of_a_used_up_stock() {
        let stock = LocalStock::new(1);
        stock.take().unwrap().commit();
        assert!(stock.take().is_none());
        stock.add(2);
        stock.take().unwrap().commit();
        assert_eq!((stock.sold(), stock.remaining()), (2, 1));
        stock.refill();
        assert_eq!((stock.sold(), stock.remaining()), (0, 1));
    }

    #[test]
    fn concurrent_takers_sell_exactly_the_capacity() {
        let stock = Arc::new(LocalStock::new(10_000));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let stock = Arc::clone(&stock);
                std::thread::spawn(move || {
                    let mut sold = 0u64;
                    for n in 0..5_000 {
                        if let Some(reservation) = stock.take() {
                            // Every third attempt fails and gives its unit back.
                            if (n + i) % 3 == 0 {
                                drop(reservation);
                            } else {
                                reservation.commit();
                                sold += 1;
                            }
                        }
                    }
                    sold
                })
            })
            .collect();
        let sold: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(sold, 10_000);
        assert_eq!(stock.remaining(), 0);
    }
}
