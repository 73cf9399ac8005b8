//! The shipment-to-invoice scenario's traffic: orders the ERP knows, the
//! shop's `orders/create` webhooks and the WMS's shipment confirmations,
//! shaped as in `examples/shipment-to-invoice/README.md`.

use serde_json::{Value, json};
use tallyman_testing::erp::{Order, OrderLine, SimErp};

/// One order of the batch: what was ordered and what the WMS shipped.
#[derive(Clone, Debug)]
pub struct Shipment {
    pub order_id: String,
    /// (sku, ordered qty, unit price)
    pub ordered: Vec<(&'static str, i64, &'static str)>,
    /// (sku, shipped qty)
    pub shipped: Vec<(&'static str, i64)>,
    /// Who confirmed the shipment (the initiator of a variance case).
    pub confirmed_by: &'static str,
}

impl Shipment {
    /// Shipped exactly as ordered.
    pub fn matching(order_id: &str, lines: Vec<(&'static str, i64, &'static str)>) -> Shipment {
        Shipment {
            order_id: order_id.to_string(),
            shipped: lines.iter().map(|(sku, qty, _)| (*sku, *qty)).collect(),
            ordered: lines,
            confirmed_by: "j.smith",
        }
    }

    /// The ERP's copy of the order.
    pub fn seed(&self, erp: &SimErp) {
        erp.seed_order(Order {
            order_id: self.order_id.clone(),
            customer_id: format!("C-{}", self.order_id),
            currency: "EUR".into(),
            lines: self
                .ordered
                .iter()
                .map(|(sku, qty, price)| OrderLine::new(*sku, *qty, *price))
                .collect(),
        });
    }

    /// The shop's `orders/create` webhook.
    pub fn order_created(&self) -> Value {
        json!({
            "topic": "orders/create",
            "webhookId": format!("wh-{}", self.order_id),
            "order": {
                "number": self.order_id,
                "channel": "web",
                "customer": {"id": format!("C-{}", self.order_id)},
                "currency": "EUR",
                "totalPrice": "0.00",
                "lineItems": self.ordered.iter().map(|(sku, qty, price)| json!({
                    "sku": sku, "quantity": qty, "price": price
                })).collect::<Vec<_>>(),
            }
        })
    }

    /// The WMS's shipment confirmation.
    pub fn shipment_confirmed(&self) -> Value {
        json!({
            "eventId": format!("evt-shp-{}", self.order_id),
            "id": format!("SHP-{}", self.order_id),
            "orderRef": self.order_id,
            "status": "CONFIRMED",
            "warehouse": "DE-HAM-1",
            "carrier": "DHL",
            "confirmedBy": self.confirmed_by,
            "items": self.shipped.iter().map(|(sku, qty)| json!({
                "sku": sku, "quantity": qty
            })).collect::<Vec<_>>(),
        })
    }

    /// The invoice's net amount, in cents: shipped quantities at the
    /// ordered prices.
    pub fn shipped_cents(&self) -> i64 {
        self.shipped
            .iter()
            .map(|(sku, qty)| {
                let price = self
                    .ordered
                    .iter()
                    .find(|(s, _, _)| s == sku)
                    .map_or("0", |(_, _, p)| *p);
                qty * cents(price)
            })
            .sum()
    }
}

/// "19.90" → 1990.
pub fn cents(decimal: &str) -> i64 {
    let (whole, frac) = decimal.split_once('.').unwrap_or((decimal, ""));
    let frac = format!("{frac:0<2}");
    whole.parse::<i64>().expect("whole units") * 100 + frac[..2].parse::<i64>().expect("cents")
}

/// 77170 → "771.70".
pub fn amount(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// The demo's batch: 16 orders that ship as ordered, one that ships with a
/// variance small enough for the policy to approve by itself, one whose
/// variance needs a finance controller, and one whose shipment arrives
/// before its order.
pub struct Batch {
    pub matching: Vec<Shipment>,
    pub tiny_variance: Shipment,
    pub needs_approval: Shipment,
    pub out_of_order: Shipment,
}

impl Batch {
    pub fn new() -> Batch {
        let catalogue: [(&'static str, &'static str); 5] = [
            ("A-100", "19.90"),
            ("B-200", "149.00"),
            ("C-300", "1.25"),
            ("D-400", "89.00"),
            ("E-500", "0.35"),
        ];
        let matching = (0..16)
            .map(|i| {
                let first = catalogue[i % 5];
                let second = catalogue[(i + 2) % 5];
                Shipment::matching(
                    &format!("{}", 4701 + i),
                    vec![
                        (first.0, 1 + (i as i64 % 4), first.1),
                        (second.0, 2 + (i as i64 % 3) * 5, second.1),
                    ],
                )
            })
            .collect();
        let tiny_variance = Shipment {
            order_id: "4717".into(),
            ordered: vec![("C-300", 200, "1.25")],
            shipped: vec![("C-300", 199)],
            confirmed_by: "j.smith",
        };
        let needs_approval = Shipment {
            order_id: "4718".into(),
            ordered: vec![("A-100", 3, "19.90"), ("D-400", 10, "89.00")],
            shipped: vec![("A-100", 3), ("D-400", 8)],
            confirmed_by: "j.smith",
        };
        let out_of_order = Shipment::matching("4719", vec![("B-200", 2, "149.00")]);
        Batch {
            matching,
            tiny_variance,
            needs_approval,
            out_of_order,
        }
    }

    /// Every order of the batch.
    pub fn all(&self) -> Vec<&Shipment> {
        let mut all: Vec<&Shipment> = self.matching.iter().collect();
        all.extend([
            &self.tiny_variance,
            &self.needs_approval,
            &self.out_of_order,
        ]);
        all
    }
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_exact_cents() {
        assert_eq!(cents("19.90"), 1990);
        assert_eq!(cents("0.35"), 35);
        assert_eq!(cents("149"), 14900);
        assert_eq!(amount(77170), "771.70");
        let batch = Batch::new();
        // 3 × 19.90 + 8 × 89.00
        assert_eq!(batch.needs_approval.shipped_cents(), 77170);
        assert_eq!(batch.tiny_variance.shipped_cents(), 24875);
    }
}
