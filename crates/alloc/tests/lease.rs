//! Behaviour of the lease table that the engine relies on.

use futures::FutureExt;
use qcow2_alloc::LeaseTable;
use qcow2_format::HostCluster;

const H: HostCluster = HostCluster(7);

#[test]
fn shared_leases_coexist_and_block_exclusive() {
    let t = LeaseTable::new();
    let a = t.try_shared(H).expect("free cluster");
    let b = t.try_shared(H).expect("shared leases coexist");
    assert!(t.is_leased(H));
    let mut excl = Box::pin(t.exclusive(H));
    assert!(
        (&mut excl).now_or_never().is_none(),
        "exclusive must wait for readers"
    );
    // A waiting exclusive holder keeps the cluster leased and blocks new shared leases.
    assert!(t.try_shared(H).is_none());
    drop(a);
    assert!(
        (&mut excl).now_or_never().is_none(),
        "one reader still holds it"
    );
    drop(b);
    let x = excl.now_or_never().expect("all readers gone");
    assert!(t.is_leased(H));
    assert!(t.try_shared(H).is_none());
    drop(x);
    assert!(!t.is_leased(H));
    assert!(t.is_empty());
}

#[test]
fn released_leases_leave_no_entry() {
    let t = LeaseTable::new();
    for c in 0..100 {
        let l = t.try_shared(HostCluster(c)).unwrap();
        assert_eq!(l.cluster(), HostCluster(c));
    }
    assert!(t.is_empty());
    assert!(!t.is_leased(HostCluster(3)));
}

#[test]
fn cancelled_wait_does_not_leave_the_cluster_leased() {
    let t = LeaseTable::new();
    let s = t.try_shared(H).unwrap();
    let mut excl = Box::pin(t.exclusive(H));
    assert!((&mut excl).now_or_never().is_none());
    drop(excl); // the freer gave up
    drop(s);
    assert!(
        !t.is_leased(H),
        "a cancelled waiter must not pin the cluster"
    );
    assert!(t.try_shared(H).is_some());
}

#[test]
fn shared_waits_for_exclusive() {
    let t = LeaseTable::new();
    let x = t.exclusive(H).now_or_never().unwrap();
    let mut sh = Box::pin(t.shared(H));
    assert!((&mut sh).now_or_never().is_none());
    drop(x);
    let s = sh.now_or_never().expect("exclusive released");
    assert!(t.is_leased(H));
    drop(s);
    assert!(!t.is_leased(H));
}
