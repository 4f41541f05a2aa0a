//! Anonymous reads of the whole-run views cost no scan while nothing changed: `/v1/status` and
//! `/v1/leaderboard` are computed once per change to the run, however often they are asked for
//! (before, each request read every submission, rejection and score). Alone in its test binary:
//! it reads the process's metrics.

mod common;

use common::*;

fn computed(url: &str, view: &str) -> u64 {
    let text = client(url).get("/metrics").send().unwrap().text().unwrap();
    let line = format!("tessera_hub_views_computed_total{{view=\"{view}\"}}");
    text.lines().find_map(|l| l.strip_prefix(&line)).map_or(0, |n| n.trim().parse().unwrap())
}

#[test]
fn whole_run_views_are_computed_once_per_change() {
    let Some(b) = backend("sqlite") else { return };
    let server = Server::start(&b, spec(2));
    let url = server.url.clone();
    let a = Client::register(&url, "a");
    // A stranger's refused submissions pile up rejections.
    let run = info(&url);
    for _ in 0..20 {
        let _ = a.submit_raw(b"not a message".to_vec());
    }
    let (status0, board0) = (computed(&url, "status"), computed(&url, "leaderboard"));
    let first = status_of(&url);
    for _ in 0..50 {
        assert_eq!(status_of(&url).contributors, first.contributors);
        leaderboard(&url);
    }
    assert_eq!(computed(&url, "status") - status0, 1, "the status was recomputed while nothing changed");
    assert_eq!(computed(&url, "leaderboard") - board0, 1);
    assert_eq!(first.contributors[0].rejected, 20);
    // A change is seen at once, for one more computation.
    a.submit(&run, 0, &run.checkpoint, &delta(1.0)).unwrap();
    let after = status_of(&url);
    assert_eq!(after.contributors[0].accepted, 1);
    assert_eq!(status_of(&url).contributors[0].accepted, 1);
    assert_eq!(computed(&url, "status") - status0, 2);
    server.stop();
}
