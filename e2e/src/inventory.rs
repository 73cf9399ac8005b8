//! The inventory-adjustment scenario's traffic: the WMS's
//! `STOCK_ADJUSTMENT` webhooks, shaped as in
//! `examples/inventory-adjustment/README.md`; plus the valuation and the
//! ledger posting the workflow must produce, computed here in integer cents.

use serde_json::{Value, json};

use crate::money::{cents, money};

/// One stock adjustment in the WMS.
#[derive(Clone, Debug)]
pub struct Adjustment {
    pub id: String,
    pub warehouse: &'static str,
    pub reason_code: &'static str,
    pub user: &'static str,
    pub timestamp: &'static str,
    /// (sku, location, delta, unit cost with at most two decimals)
    pub lines: Vec<(&'static str, &'static str, i64, &'static str)>,
}

impl Adjustment {
    pub fn new(
        id: &str,
        reason_code: &'static str,
        lines: Vec<(&'static str, &'static str, i64, &'static str)>,
    ) -> Adjustment {
        Adjustment {
            id: id.to_string(),
            warehouse: "DE-HAM-1",
            reason_code,
            user: "k.meyer",
            timestamp: "2026-11-02T08:12:00Z",
            lines,
        }
    }

    /// The WMS's webhook.
    pub fn payload(&self) -> Value {
        json!({
            "kind": "STOCK_ADJUSTMENT",
            "id": self.id,
            "warehouse": self.warehouse,
            "reasonCode": self.reason_code,
            "user": self.user,
            "timestamp": self.timestamp,
            "lines": self.lines.iter().map(|(sku, location, delta, cost)| json!({
                "sku": sku, "location": location, "delta": delta, "unitCost": cost
            })).collect::<Vec<_>>(),
        })
    }

    /// The lines that change stock (the gateway drops zero deltas).
    pub fn moving(&self) -> Vec<(&'static str, &'static str, i64, &'static str)> {
        self.lines.iter().copied().filter(|l| l.2 != 0).collect()
    }

    /// Σ delta × unit cost, in cents (gains positive, losses negative).
    pub fn net_cents(&self) -> i64 {
        self.moving().iter().map(|(_, _, d, c)| d * cents(c)).sum()
    }

    /// Σ |delta × unit cost|, in cents.
    pub fn gross_cents(&self) -> i64 {
        self.moving()
            .iter()
            .map(|(_, _, d, c)| (d * cents(c)).abs())
            .sum()
    }

    /// The stock-difference account of the reason code.
    pub fn gl_account(&self) -> &'static str {
        match self.reason_code {
            "CYCLE_COUNT" => "5400",
            "DAMAGE" => "5410",
            "SHRINKAGE" => "5420",
            _ => "5499",
        }
    }

    /// Each posted line's value, as the ledger must receive it.
    pub fn line_values(&self) -> Vec<String> {
        self.moving()
            .iter()
            .map(|(_, _, d, c)| money(d * cents(c)))
            .collect()
    }

    /// The default idempotency key of the posting step.
    pub fn posting_key(&self) -> String {
        format!("finance/inventory-adjustment/{}/posting", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valuation_counts_gains_and_losses() {
        let a = Adjustment::new(
            "ADJ-1",
            "CYCLE_COUNT",
            vec![
                ("SCREW-4", "A01", 5, "20.00"),
                ("TV-55", "H01", -1, "412.50"),
                ("CABLE", "B02", 0, "3.00"),
            ],
        );
        assert_eq!(a.net_cents(), 10000 - 41250);
        assert_eq!(a.gross_cents(), 10000 + 41250);
        assert_eq!(a.line_values(), vec!["100.00", "-412.50"]);
        assert_eq!(a.moving().len(), 2);
    }
}
