//! Wills of connections lost with their holder node: marked due by the owners, published by the primary
//! owner once their delay has passed (see the module above).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Registrar, RegistrarEvent};

impl Registrar {
    /// A registration made before its holder went down, with its client connected: the client counts
    /// as disconnected, and its will (if any) is due after its delay. (Not "whose holder is not up
    /// here": a node that just started, or just healed, has not seen every peer come up yet, and a
    /// connection made on the other side of a partition was not lost.)
    pub(super) fn note_loss(&mut self, client: &Arc<str>, now: Instant) {
        let Some(r) = self.table.get(client) else { return };
        let lost = self.lost.get(&r.holder).is_some_and(|at| r.stamp <= *at);
        let (epoch, lost) = (r.epoch, r.connected && lost);
        if lost {
            self.table.holder_lost(client, epoch);
        }
        let r = self.table.get(client).expect("present");
        if let Some(w) = r.will.as_ref().filter(|_| !r.connected) {
            let due = now + Duration::from_secs(w.delay_s as u64);
            self.wills.entry((client.clone(), epoch)).or_insert(due);
        }
    }

    /// Publishes the wills due whose primary owner this node is; drops those no longer due (a newer
    /// registration, or published by another owner).
    pub(super) fn fire_wills(&mut self, now: Instant) {
        let keys: Vec<(Arc<str>, u64)> = self.wills.keys().cloned().collect();
        for (client, epoch) in keys {
            let due = self.wills[&(client.clone(), epoch)];
            let still =
                self.table.get(&client).is_some_and(|r| r.epoch == epoch && !r.connected && r.will.is_some());
            if !still {
                self.wills.remove(&(client, epoch));
                continue;
            }
            if due > now || self.owners_of(&client).primary != self.me {
                continue;
            }
            self.wills.remove(&(client.clone(), epoch));
            let will = self.table.get(&client).and_then(|r| r.will.clone()).expect("checked");
            self.table.will_published(&client, epoch);
            self.counters.wills_published += 1;
            self.events.push_back(RegistrarEvent::PublishWill { client: client.clone(), epoch, will });
            self.copy_to_owners(&client);
        }
    }
}
