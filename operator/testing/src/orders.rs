//! The shipment-to-invoice traffic the crash tests and the benchmark send:
//! order `i` is 2 x A at 19.99 and 5 x B at 0.10 (40.48 net), shipped in
//! full, so its invoice is known to the cent.

use crate::erp::{Order, OrderLine};

/// The ERP's record of order `i`.
pub fn order(i: usize) -> Order {
    Order {
        order_id: format!("ORD-{i}"),
        customer_id: format!("C-{i}"),
        currency: "EUR".into(),
        lines: vec![
            OrderLine::new("A", 2, "19.99"),
            OrderLine::new("B", 5, "0.10"),
        ],
    }
}

/// The two canonical events of order `i`, as the gateway would publish
/// them: `(type, id, payload)`, `order.created` first.
pub fn events(i: usize, source: &str) -> [(&'static str, String, String); 2] {
    let order = format!("ORD-{i}");
    let data = [
        (
            "order.created",
            format!(r#"{{"orderId":"{order}","customerId":"C-{i}","channel":"web"}}"#),
        ),
        (
            "shipment.confirmed",
            format!(
                r#"{{"orderId":"{order}","shipmentId":"SH-{i}","warehouse":"HAM","confirmedBy":"wms-7","lines":[{{"sku":"A","qty":2}},{{"sku":"B","qty":5}}]}}"#
            ),
        ),
    ];
    data.map(|(ty, data)| {
        let id = format!("{ty}-{i}");
        let payload =
            format!(r#"{{"id":"{id}","type":"{ty}","source":"{source}","time":"2026-11-26T09:00:00Z","data":{data}}}"#);
        (ty, id, payload)
    })
}
