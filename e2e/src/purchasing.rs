//! The three-way-match scenario's traffic: the ERP's `PurchaseOrder.Created`,
//! the WMS's posted goods receipts and the AP inbox's captured vendor
//! invoices, shaped as in `examples/three-way-match/README.md`; plus the
//! match the workflow must compute, here independently in integer units.

use serde_json::{Value, json};

use crate::money::{cents, div_half_even, div_half_up};

/// One purchase: the PO, what the warehouse accepted, what the vendor billed.
#[derive(Clone, Debug)]
pub struct Purchase {
    pub po_number: String,
    pub vendor_id: &'static str,
    pub currency: &'static str,
    /// (sku, qty, net price; up to four decimal places)
    pub ordered: Vec<(&'static str, i64, &'static str)>,
    /// (sku, received, damaged)
    pub received: Vec<(&'static str, i64, i64)>,
    /// (sku, qty, unit price)
    pub invoiced: Vec<(&'static str, i64, &'static str)>,
    pub invoice_currency: &'static str,
    pub net_total: &'static str,
    pub tax_total: &'static str,
    /// `YYYY-MM-DD`
    pub due_date: &'static str,
    pub captured_by: &'static str,
}

/// A decimal with up to four places, in ten-thousandths: "0.0525" → 525.
pub fn ten_thousandths(decimal: &str) -> i64 {
    let (whole, frac) = decimal.split_once('.').unwrap_or((decimal, ""));
    assert!(
        frac.len() <= 4,
        "{decimal} has more than four decimal places"
    );
    let frac = format!("{frac:0<4}");
    whole.parse::<i64>().expect("whole units") * 10_000 + frac.parse::<i64>().expect("fraction")
}

impl Purchase {
    /// Ordered, received in full and invoiced exactly at the PO's prices,
    /// due in the past (no hold before the payment approval).
    pub fn matching(
        po_number: &str,
        ordered: Vec<(&'static str, i64, &'static str)>,
        net_total: &'static str,
        tax_total: &'static str,
    ) -> Purchase {
        Purchase {
            po_number: po_number.to_string(),
            vendor_id: "V-0042",
            currency: "EUR",
            received: ordered
                .iter()
                .map(|(sku, qty, _)| (*sku, *qty, 0))
                .collect(),
            invoiced: ordered.clone(),
            ordered,
            invoice_currency: "EUR",
            net_total,
            tax_total,
            due_date: "2026-11-20",
            captured_by: "ap.clerk",
        }
    }

    pub fn invoice_id(&self) -> String {
        format!("DOC-{}", self.po_number)
    }

    pub fn vendor_invoice_number(&self) -> String {
        format!("ACME-{}", self.po_number)
    }

    pub fn receipt_id(&self) -> String {
        format!("GR-{}", self.po_number)
    }

    /// The ERP's `PurchaseOrder.Created`.
    pub fn po_created(&self) -> Value {
        json!({
            "event": "PurchaseOrder.Created",
            "messageId": format!("msg-{}", self.po_number),
            "purchaseOrder": {
                "number": self.po_number,
                "vendor": {"id": self.vendor_id, "name": "Acme Fasteners"},
                "currency": self.currency,
                "createdBy": "buyer.jane",
                "lines": self.ordered.iter().enumerate().map(|(i, (sku, qty, price))| json!({
                    "lineNo": 10 * (i + 1), "material": sku, "quantity": qty, "netPrice": price
                })).collect::<Vec<_>>(),
            }
        })
    }

    /// The WMS's posted goods receipt.
    pub fn goods_receipt(&self) -> Value {
        json!({
            "type": "GOODS_RECEIPT",
            "status": "POSTED",
            "id": self.receipt_id(),
            "poNumber": self.po_number,
            "warehouse": "DE-HAM-1",
            "receivedBy": "k.meyer",
            "lines": self.received.iter().map(|(sku, received, damaged)| json!({
                "sku": sku, "received": received, "damaged": damaged
            })).collect::<Vec<_>>(),
        })
    }

    /// The AP inbox's captured vendor invoice.
    pub fn vendor_invoice(&self) -> Value {
        json!({
            "documentType": "INVOICE",
            "documentId": self.invoice_id(),
            "capturedBy": self.captured_by,
            "invoice": {
                "number": self.vendor_invoice_number(),
                "vendorId": self.vendor_id,
                "poReference": self.po_number,
                "currency": self.invoice_currency,
                "dueDate": self.due_date,
                "netTotal": self.net_total,
                "taxTotal": self.tax_total,
                "lines": self.invoiced.iter().map(|(sku, qty, price)| json!({
                    "sku": sku, "quantity": qty, "unitPrice": price
                })).collect::<Vec<_>>(),
            }
        })
    }

    /// `round(Σ qty × price, 2)` in cents (half-even).
    pub fn po_value_cents(&self) -> i64 {
        let sum: i64 = self
            .ordered
            .iter()
            .map(|(_, qty, price)| qty * ten_thousandths(price))
            .sum();
        div_half_even(sum, 100)
    }

    /// Net plus tax, in cents: what the payment approval carries.
    pub fn payable_cents(&self) -> i64 {
        cents(self.net_total) + cents(self.tax_total)
    }

    /// Invoice net minus PO value, in cents.
    pub fn difference_cents(&self) -> i64 {
        cents(self.net_total) - self.po_value_cents()
    }

    /// The tolerance, `roundHalfUp(poValue × 0.005, 2)`, in cents.
    pub fn tolerance_cents(&self) -> i64 {
        div_half_up(self.po_value_cents() * 5, 1000)
    }

    /// Every PO line received and invoiced in full, nothing else invoiced.
    pub fn quantities_match(&self) -> bool {
        self.ordered.iter().all(|(sku, qty, _)| {
            self.received
                .iter()
                .any(|(s, r, d)| s == sku && r - d == *qty)
                && self.invoiced.iter().any(|(s, q, _)| s == sku && q == qty)
        }) && self
            .invoiced
            .iter()
            .all(|(sku, _, _)| self.ordered.iter().any(|(s, _, _)| s == sku))
    }

    /// Whether the workflow pays without asking the policy.
    pub fn three_way(&self) -> bool {
        self.quantities_match()
            && self.currency == self.invoice_currency
            && self.difference_cents().abs() <= self.tolerance_cents()
    }

    /// `round(pct(|difference|, poValue), 2)` in hundredths of a percent.
    pub fn difference_basis_points(&self) -> i64 {
        div_half_even(
            self.difference_cents().abs() * 10_000,
            self.po_value_cents(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_match_is_computed_exactly() {
        let p = Purchase::matching("PO-1", vec![("WASHER-12", 501, "1.00")], "503.51", "95.67");
        assert_eq!(p.po_value_cents(), 50100);
        // 501.00 × 0.005 = 2.505 → 2.51 half-up (half-even would be 2.50).
        assert_eq!(p.tolerance_cents(), 251);
        assert!(p.three_way());
        assert_eq!(p.payable_cents(), 59918);
        let q = Purchase::matching("PO-2", vec![("NUT-M8", 2000, "0.0525")], "108.00", "20.52");
        assert_eq!(q.po_value_cents(), 10500);
        assert_eq!(q.tolerance_cents(), 53);
        assert!(!q.three_way());
        assert_eq!(q.difference_basis_points(), 286);
    }
}
