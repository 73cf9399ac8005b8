//! The returns-to-credit scenario's traffic: the sales orders the ERP knows,
//! and the WMS's `RETURN_RECEIVED` / `RETURN_INSPECTED` webhooks, shaped as
//! in `examples/returns-to-credit/README.md`; plus the credit the workflow
//! must book, computed here independently in integer cents.

use serde_json::{Value, json};
use tallyman_testing::erp::{Order, OrderLine, SimErp};

use crate::money::{cents, div_half_even, money};

/// One return: the original order, and what came back in which grade.
#[derive(Clone, Debug)]
pub struct Return {
    pub rma: String,
    pub order_id: String,
    pub customer_id: String,
    /// (sku, ordered qty, unit price)
    pub ordered: Vec<(&'static str, i64, &'static str)>,
    /// (sku, returned qty, grade A–D)
    pub returned: Vec<(&'static str, i64, &'static str)>,
    pub received_by: &'static str,
    pub inspected_by: &'static str,
}

/// A line of the expected credit note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreditLine {
    pub sku: &'static str,
    pub qty: i64,
    pub unit_price: &'static str,
    /// The rate's JSON text as the workflow writes it: "1", "0.85", "0.5".
    pub rate: &'static str,
    pub amount: String,
}

impl Return {
    pub fn new(
        rma: &str,
        order_id: &str,
        ordered: Vec<(&'static str, i64, &'static str)>,
        returned: Vec<(&'static str, i64, &'static str)>,
    ) -> Return {
        Return {
            rma: rma.to_string(),
            order_id: order_id.to_string(),
            customer_id: format!("C-{order_id}"),
            ordered,
            returned,
            received_by: "j.smith",
            inspected_by: "m.mueller",
        }
    }

    /// The ERP's copy of the sales order.
    pub fn seed(&self, erp: &SimErp) {
        erp.seed_order(Order {
            order_id: self.order_id.clone(),
            customer_id: self.customer_id.clone(),
            currency: "EUR".into(),
            lines: self
                .ordered
                .iter()
                .map(|(sku, qty, price)| OrderLine::new(*sku, *qty, *price))
                .collect(),
        });
    }

    /// The WMS's `RETURN_RECEIVED`.
    pub fn received(&self) -> Value {
        json!({
            "eventType": "RETURN_RECEIVED",
            "eventId": format!("evt-rcv-{}", self.rma),
            "rma": self.rma,
            "orderRef": self.order_id,
            "customerId": self.customer_id,
            "receivedBy": self.received_by,
            "items": self.returned.iter().map(|(sku, qty, _)| json!({
                "sku": sku, "quantity": qty
            })).collect::<Vec<_>>(),
        })
    }

    /// The WMS's `RETURN_INSPECTED`.
    pub fn inspected(&self) -> Value {
        json!({
            "eventType": "RETURN_INSPECTED",
            "eventId": format!("evt-insp-{}", self.rma),
            "rma": self.rma,
            "inspectedBy": self.inspected_by,
            "items": self.returned.iter().map(|(sku, qty, grade)| json!({
                "sku": sku, "quantity": qty, "grade": grade
            })).collect::<Vec<_>>(),
        })
    }

    fn price(&self, sku: &str) -> &'static str {
        self.ordered
            .iter()
            .find(|(s, _, _)| *s == sku)
            .map(|(_, _, p)| *p)
            .unwrap_or_else(|| panic!("{sku} is not on order {}", self.order_id))
    }

    /// The credit rate of a grade, in percent, and as the workflow writes it.
    fn rate(grade: &str) -> (i64, &'static str) {
        match grade {
            "A" => (100, "1"),
            "B" => (85, "0.85"),
            "C" => (50, "0.5"),
            _ => (0, "0"),
        }
    }

    /// The full value of the returned goods, in cents.
    pub fn full_value_cents(&self) -> i64 {
        self.returned
            .iter()
            .map(|(sku, qty, _)| qty * cents(self.price(sku)))
            .sum()
    }

    /// The credit, in cents: Σ qty × price × rate, rounded half-even once.
    pub fn credit_cents(&self) -> i64 {
        let hundredths: i64 = self
            .returned
            .iter()
            .map(|(sku, qty, grade)| qty * cents(self.price(sku)) * Self::rate(grade).0)
            .sum();
        div_half_even(hundredths, 100)
    }

    /// The credit note's lines: every line with a rate above zero, each
    /// amount rounded half-even on its own.
    pub fn credit_lines(&self) -> Vec<CreditLine> {
        self.returned
            .iter()
            .filter(|(_, _, grade)| Self::rate(grade).0 > 0)
            .map(|(sku, qty, grade)| {
                let (pct, rate) = Self::rate(grade);
                CreditLine {
                    sku,
                    qty: *qty,
                    unit_price: self.price(sku),
                    rate,
                    amount: money(div_half_even(qty * cents(self.price(sku)) * pct, 100)),
                }
            })
            .collect()
    }

    /// Whether any returned item is graded C or D (an approval is asked).
    pub fn damaged(&self) -> bool {
        self.returned
            .iter()
            .any(|(_, _, g)| !matches!(*g, "A" | "B"))
    }

    /// The credit note's external reference.
    pub fn reference(&self) -> String {
        format!("rma-{}", self.rma)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_are_exact_cents() {
        let r = Return::new(
            "RMA-1",
            "1",
            vec![
                ("B-200", 10, "149.00"),
                ("F-600", 1, "12.10"),
                ("E-500", 4, "0.35"),
            ],
            vec![("B-200", 10, "C"), ("F-600", 1, "B"), ("E-500", 4, "D")],
        );
        // 745.00 + 10.285 + 0 = 755.285 → 755.28 (half-even)
        assert_eq!(r.credit_cents(), 75528);
        assert_eq!(r.full_value_cents(), 149000 + 1210 + 140);
        let lines = r.credit_lines();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].amount, "10.28");
        assert!(r.damaged());
    }
}
