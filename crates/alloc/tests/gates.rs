//! Behaviour of the allocation gates (invariant I6) that the engine relies on.

use futures::FutureExt;
use qcow2_alloc::Gates;

#[test]
fn one_allocator_per_guest_cluster() {
    let g = Gates::new();
    let a = g.begin(5).expect("nobody allocates cluster 5");
    assert_eq!(a.guest_cluster(), 5);
    assert!(g.is_allocating(5));
    let gate = g.begin(5).expect_err("a second allocator must wait");
    let b = g.begin(6).expect("another guest cluster is independent");
    assert_eq!(g.len(), 2);

    let mut wait = Box::pin(gate.wait());
    assert!(
        (&mut wait).now_or_never().is_none(),
        "closed while allocating"
    );
    drop(a);
    assert!(
        !g.is_allocating(5),
        "the gate leaves the table before waking"
    );
    wait.now_or_never().expect("open once the guard dropped");

    let c = g
        .begin(5)
        .expect("a new allocation after the first finished");
    drop((b, c));
    assert!(g.is_empty());
}

#[test]
fn lookups_over_a_range() {
    let g = Gates::new();
    assert!(g.get(1).is_none());
    assert!(g.first_in(0..10).is_none());
    let guard = g.begin(7).unwrap();
    let gate = g.first_in(0..10).expect("cluster 7 is in the range");
    assert!(g.first_in(8..10).is_none());
    let copy = gate.clone();
    drop(guard);
    gate.wait().now_or_never().expect("open");
    copy.wait().now_or_never().expect("open");
    assert!(g.is_empty());
}

#[test]
fn a_cancelled_allocation_opens_its_gate() {
    let g = Gates::new();
    let gate = {
        let guard = g.begin(3).unwrap();
        let gate = g.get(3).unwrap();
        drop(guard); // the allocating write's future was dropped mid-I/O
        gate
    };
    gate.wait().now_or_never().expect("nobody waits forever");
    // A waiter that gives up leaves nothing behind either.
    let guard = g.begin(3).unwrap();
    let mut wait = Box::pin(g.get(3).unwrap().wait());
    assert!((&mut wait).now_or_never().is_none());
    drop(wait);
    drop(guard);
    assert!(g.is_empty());
    assert!(g.begin(3).is_ok());
}
