//! Leader election on a Lease in the fake API server: two candidates, one
//! leader, takeover after expiry. Time is passed in, so nothing sleeps.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use tallyman_controller::leader::{LeaseLock, must_step_down};
use tallyman_testing::kubeapi::FakeApi;

const NS: &str = "tallyman-system";
const TTL: Duration = Duration::from_secs(15);

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

#[tokio::test]
async fn one_leader_and_a_takeover_after_expiry() {
    let api = FakeApi::start().await;
    let a = LeaseLock::new(api.client(), NS, "tallyman-operator", "pod-a", TTL);
    let b = LeaseLock::new(api.client(), NS, "tallyman-operator", "pod-b", TTL);

    assert!(
        a.try_acquire_or_renew(at(0)).await.unwrap(),
        "the first candidate creates and holds it"
    );
    assert!(
        !b.try_acquire_or_renew(at(1)).await.unwrap(),
        "the second follows"
    );
    assert!(
        a.try_acquire_or_renew(at(5)).await.unwrap(),
        "the leader renews"
    );
    assert!(
        !b.try_acquire_or_renew(at(19)).await.unwrap(),
        "renewed at 5, valid until 20"
    );

    // a stops renewing; after expiry b takes over, and a does not get it back.
    assert!(b.try_acquire_or_renew(at(21)).await.unwrap());
    assert!(!a.try_acquire_or_renew(at(22)).await.unwrap());
    let lease = Api::<Lease>::namespaced(api.client(), NS)
        .get("tallyman-operator")
        .await
        .unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-b"));
    assert_eq!(spec.lease_transitions, Some(1));
}

#[tokio::test]
async fn a_race_for_the_lease_has_one_winner() {
    let api = FakeApi::start().await;
    let a = LeaseLock::new(api.client(), NS, "l", "pod-a", TTL);
    let b = LeaseLock::new(api.client(), NS, "l", "pod-b", TTL);
    a.try_acquire_or_renew(at(0)).await.unwrap();
    // Both see an expired Lease; the write guarded by resourceVersion lets one through.
    api.fail_next(
        "PUT",
        "/apis/coordination.k8s.io/v1/namespaces/tallyman-system/leases/l",
        409,
        1,
    );
    assert!(
        !b.try_acquire_or_renew(at(100)).await.unwrap(),
        "the loser learns it by a 409"
    );
    assert!(a.try_acquire_or_renew(at(101)).await.unwrap());
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once() {
    let api = FakeApi::start().await;
    let a = LeaseLock::new(api.client(), NS, "l", "pod-a", TTL);
    let b = LeaseLock::new(api.client(), NS, "l", "pod-b", TTL);
    a.try_acquire_or_renew(at(0)).await.unwrap();
    b.release().await.unwrap(); // not b's to release
    assert!(!b.try_acquire_or_renew(at(1)).await.unwrap());
    a.release().await.unwrap();
    assert!(b.try_acquire_or_renew(at(2)).await.unwrap());
}

#[test]
fn a_leader_that_cannot_renew_steps_down_before_expiry() {
    let renewed = at(0);
    assert!(!must_step_down(
        renewed,
        renewed + SignedDuration::from_secs(9),
        TTL
    ));
    assert!(must_step_down(
        renewed,
        renewed + SignedDuration::from_secs(10),
        TTL
    ));
}
