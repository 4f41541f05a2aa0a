//! The hub over real HTTP, on SQLite and a local store, and, where the test command provides
//! them, on PostgreSQL (`TESSERA_TEST_POSTGRES`) and an S3-compatible server (`TESSERA_TEST_S3`):
//! rounds, refusals, staleness, deadlines, restarts, scores and layer-sharded runs.

mod common;

use common::*;

#[test]
fn a_spec_without_feedback_decay_means_plain_error_feedback() {
    let mut json = serde_json::to_value(spec(1)).unwrap();
    json.as_object_mut().unwrap().remove("feedback_decay");
    let back: RunSpec = serde_json::from_value(json).unwrap();
    assert_eq!(back.feedback_decay, 1.0);
    for bad in [0.0, -0.5, 1.5, f32::NAN] {
        assert!(RunSpec { feedback_decay: bad, ..spec(1) }.validate().is_err(), "{bad} accepted");
    }
    assert!(RunSpec { feedback_decay: 0.95, ..spec(1) }.validate().is_ok());
}

/// A full round: quorum closes it, the new weights are θ − mean Δ (outer lr 1, no momentum),
/// the published update reproduces the checkpoint bit for bit, and range requests work.
fn lifecycle(kind: &str) {
    let Some(b) = backend(kind) else { return };
    let server = Server::start(&b, spec(2));
    let url = server.url.clone();
    let run = info(&url);
    assert_eq!(run.round, 0);
    let (a, c) = (Client::register(&url, "a"), Client::register(&url, "c"));
    assert_ne!(a.id, c.id);
    let asg = a.assignment(0);
    assert_eq!((asg.round, asg.base_checkpoint.as_str(), asg.finished), (0, run.checkpoint.as_str(), false));
    let ra = a.submit(&run, 0, &run.checkpoint, &delta(1.0)).unwrap();
    assert_eq!((ra.round, ra.staleness, ra.weight), (0, 0, 1.0));
    // Already submitted for the open round: the assignment waits, then repeats the round.
    assert_eq!(a.assignment(200).round, 0);
    c.submit(&run, 0, &run.checkpoint, &delta(-3.0)).unwrap();
    let after = info(&url);
    assert_eq!(after.round, 1);
    assert_eq!(a.assignment(0).base_checkpoint, after.checkpoint);

    let bytes = client(&url).checkpoint(&after.checkpoint, None).unwrap();
    assert_eq!(hex::encode(weights_hash(&bytes)), after.checkpoint);
    let theta = decode_weights(&bytes, &run.spec.tensors).unwrap();
    let (d1, d2, t0) = (delta(1.0), delta(-3.0), initial());
    for i in 0..2 {
        for j in 0..t0[i].len() {
            let want = t0[i][j] - (d1[i][j] + d2[i][j]) / 2.0;
            assert!((theta[i][j] - want).abs() < 1e-6, "tensor {i}[{j}]: {} vs {want}", theta[i][j]);
        }
    }
    // The update into round 1 turns the round-0 weights into exactly the round-1 checkpoint.
    let update = client(&url).update(1).unwrap();
    let view = MessageView::parse(&update).unwrap();
    assert_eq!((view.round, hex::encode(view.base_checkpoint)), (1, run.checkpoint.clone()));
    let rebuilt = view.apply_to(&t0).unwrap();
    let rebuilt_bytes = tessera_protocol::encode_weights(&run.spec.tensors, &rebuilt).unwrap();
    assert_eq!(rebuilt_bytes, bytes);

    let http = client(&url);
    let path = format!("/v1/checkpoints/{}", after.checkpoint);
    let r = http.get(&path).header("range", "bytes=10-19").send().unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], format!("bytes 10-19/{}", bytes.len()).as_str());
    assert_eq!(r.headers()["content-length"], "10");
    assert_eq!(r.bytes().unwrap().as_ref(), &bytes[10..20]);
    // Streamed from the store, with its length announced up front.
    let r = http.get(&path).send().unwrap();
    assert_eq!(r.headers()["content-length"], bytes.len().to_string().as_str());
    assert_eq!(r.bytes().unwrap().as_ref(), &bytes[..]);
    let r = http.get(&path).header("range", format!("bytes={}-", bytes.len() - 5)).send().unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), &bytes[bytes.len() - 5..]);
    let r = http.get(&path).header("range", format!("bytes={}-", bytes.len() + 5)).send().unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(http.get("/v1/updates/2").send().unwrap().status(), StatusCode::NOT_FOUND);

    let st = status_of(&url);
    assert_eq!(st.history[0].accepted, 2);
    assert_eq!(st.history[0].closed_by.as_deref(), Some("quorum"));
    assert_eq!(st.contributors.len(), 2);
    server.stop();
}

#[test]
fn lifecycle_sqlite() {
    lifecycle("sqlite");
}

#[test]
fn lifecycle_postgres() {
    lifecycle("postgres");
}

#[test]
fn lifecycle_s3() {
    lifecycle("s3");
}

/// A run on a published dataset: each submission names, in its signed path, the data its
/// assignment gave it. No claim, another shard or half a claim is refused with its reason; the
/// claim its assignment made is accepted.
/// An object above the multipart threshold goes up in parts and reads back byte for byte, from
/// a directory and from the S3-compatible server (parts of S3's minimum, 5 MiB, and a short
/// last one).
fn multipart(kind: &str) {
    let Some(b) = backend(kind) else { return };
    let store = tessera_hub::Store::open(&b.store).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let bytes: Vec<u8> = (0..(12 << 20) + 12_345u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    rt.block_on(async {
        store.put_in_parts("big/object", bytes.clone().into(), 5 << 20, 5 << 20).await.unwrap();
        assert_eq!(store.size("big/object").await.unwrap(), bytes.len() as u64);
        assert!(store.get("big/object").await.unwrap() == bytes, "the parts reassemble the object");
        store.put_in_parts("big/object", bytes[..100].to_vec().into(), 5 << 20, 5 << 20).await.unwrap();
        assert_eq!(store.get("big/object").await.unwrap().as_ref(), &bytes[..100], "overwritten whole");
    });
}

#[test]
fn multipart_directory() {
    multipart("sqlite");
}

#[test]
fn multipart_s3() {
    multipart("s3");
}

/// Contributors registering all at once get distinct ids from the database, 0 upwards, and a
/// key registering again keeps its id.
fn concurrent_registrations(kind: &str) {
    let Some(b) = backend(kind) else { return };
    let server = Server::start(&b, spec(2));
    let keys: Vec<_> = (0..24).map(|_| Arc::new(tessera_trust::Identity::generate().unwrap())).collect();
    let ids: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let (url, k) = (&server.url, k.clone());
                s.spawn(move || Client::register_key(url, &format!("c{i}"), k).id)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..24).collect::<Vec<u64>>(), "{ids:?}");
    assert_eq!(Client::register_key(&server.url, "again", keys[5].clone()).id, ids[5]);
}

#[test]
fn concurrent_registrations_sqlite() {
    concurrent_registrations("sqlite");
}

#[test]
fn concurrent_registrations_postgres() {
    concurrent_registrations("postgres");
}

#[test]
fn a_submission_claims_the_shard_it_was_assigned() {
    let b = backend("sqlite").unwrap();
    let mut manifest_run = spec(2);
    manifest_run.data.source = DataSource::Manifest {
        urls: vec!["http://127.0.0.1:9/data".into()],
        train_shards: 6,
        slots_per_round: 4,
        mixture: Vec::new(),
        weights: Vec::new(),
    };
    let server = Server::start(&b, manifest_run);
    let url = server.url.clone();
    let run = info(&url);
    let a = Client::register(&url, "a");
    let assigned = a.assignment(0).data.expect("a manifest run assigns a shard");
    let body = message(&run, Codec::F32, 0, &run.checkpoint, &delta(1.0));
    let send = |data| a.hub.submit(Arc::new(body.clone()), Some(0.5), data).map_err(refused);
    let (s, e) = send(None).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::WrongData));
    assert!(e.message.contains(&format!("shard {}", assigned.shard)), "{}", e.message);
    let other = tessera_protocol::api::DataAssignment { shard: (assigned.shard + 1) % 6, ..assigned };
    let (_, e) = send(Some(other)).unwrap_err();
    assert_eq!(e.code, ErrorCode::WrongData);
    let r = a.post(&format!("/v1/submissions?shard={}", assigned.shard), body.clone());
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().unwrap().contains("data_slot, epoch and shard"));
    send(Some(assigned)).unwrap();
}

#[test]
fn bad_submissions_get_typed_refusals() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, spec(2));
    let url = server.url.clone();
    let run = info(&url);
    let a = Client::register(&url, "a");
    let base = run.checkpoint.clone();

    let mut garbage = message(&run, Codec::F32, 0, &base, &delta(1.0));
    garbage[100] ^= 1;
    let (s, e) = a.submit_raw(garbage).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::BAD_REQUEST, ErrorCode::MalformedMessage));
    let (_, e) = a.submit_raw(b"hello".to_vec()).unwrap_err();
    assert_eq!(e.code, ErrorCode::MalformedMessage);
    let (s, e) = a.submit_raw(vec![0u8; server.hub.max_submission_bytes() + 1]).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge));

    let (s, e) = a.submit_raw(message(&run, Codec::Bf16, 0, &base, &delta(1.0))).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::CodecMismatch));
    let (_, e) = a.submit(&run, 0, &"ab".repeat(32), &delta(1.0)).unwrap_err();
    assert_eq!(e.code, ErrorCode::BaseMismatch);
    let (_, e) = a.submit(&run, 1, &base, &delta(1.0)).unwrap_err();
    assert_eq!(e.code, ErrorCode::FutureRound);
    let mut other = run.clone();
    other.run_id = "00".repeat(16);
    let (_, e) = a.submit(&other, 0, &base, &delta(1.0)).unwrap_err();
    assert_eq!(e.code, ErrorCode::WrongRun);
    let mut reshaped = run.clone();
    reshaped.spec.tensors[1].shape = vec![8, 4];
    let (_, e) = a.submit(&reshaped, 0, &base, &delta(1.0)).unwrap_err();
    assert_eq!(e.code, ErrorCode::TensorMismatch);

    // Well-formed, correctly checksummed, but a NaN inside: refused on arrival, never aggregated.
    let mut poisoned = PseudoGradient::from_bytes(&message(&run, Codec::F32, 0, &base, &delta(1.0))).unwrap();
    poisoned.tensors[1].encoded[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let (s, e) = a.submit_raw(poisoned.to_bytes()).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::BAD_REQUEST, ErrorCode::MalformedMessage));
    assert!(e.message.contains("non-finite"), "{}", e.message);

    a.submit(&run, 0, &base, &delta(1.0)).unwrap();
    let (s, e) = a.submit(&run, 0, &base, &delta(2.0)).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Duplicate));

    // An unregistered key; a request signed by one key but claiming another; no signature; a
    // replayed request (same nonce); a request from a clock far off.
    let stranger = Client::with_key(&url, Arc::new(tessera_trust::Identity::generate().unwrap()));
    let (s, e) = stranger.submit(&run, 0, &base, &delta(1.0)).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized));
    assert!(e.message.contains("not registered"), "{}", e.message);
    let body = message(&run, Codec::F32, 0, &base, &delta(3.0));
    let mut forged = stranger.signature("/v1/submissions", &body);
    forged[0].1 = a.key.public().hex();
    let r = post_signed(&a.hub, "/v1/submissions", &forged, body.clone());
    let e: ApiError = r.json().unwrap();
    assert_eq!(e.code, ErrorCode::Unauthorized);
    assert!(e.message.contains("signature"), "{}", e.message);
    let r = client(&url).request(reqwest::Method::POST, "/v1/assignments").send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: ApiError = r.json().unwrap();
    assert!(e.message.contains("x-tessera-key"), "{}", e.message);
    let x = Client::register(&url, "y");
    let once = x.signature("/v1/assignments?wait_ms=0", b"");
    let r = post_signed(&x.hub, "/v1/assignments?wait_ms=0", &once, Vec::new());
    assert_eq!(r.status(), StatusCode::OK);
    let r = post_signed(&x.hub, "/v1/assignments?wait_ms=0", &once, Vec::new());
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(r.json::<ApiError>().unwrap().code, ErrorCode::ReplayedRequest);
    let stale = x.hub.signature("POST", "/v1/assignments", b"", now_ms() - 3_600_000).unwrap();
    let r = post_signed(&x.hub, "/v1/assignments", &stale, Vec::new());
    let e: ApiError = r.json().unwrap();
    assert!(e.code == ErrorCode::Unauthorized && e.message.contains("clock"), "{e:?}");

    // Nothing refused was counted: the round still waits for its second submission.
    let st = status_of(&url);
    assert_eq!((st.round, st.history[0].accepted), (0, 0));
    assert!(st.contributors.iter().find(|c| c.id == a.id).unwrap().rejected >= 8);
    assert_eq!(server.rt.block_on(server.hub.info()).round, 0);
    server.stop();
}

/// Refused submissions leave no bytes behind: a second submission for the same round, one for
/// a round not yet open and one on the wrong base, each with fresh bytes, are refused before
/// they are stored (they once filled the disk, never to be deleted), while the accepted one
/// stays.
#[test]
fn refused_submissions_leave_no_bytes() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, spec(2));
    let url = server.url.clone();
    let run = info(&url);
    let (a, c) = (Client::register(&url, "a"), Client::register(&url, "c"));
    let base = run.checkpoint.clone();
    let accepted = message(&run, Codec::F32, 0, &base, &delta(1.0));
    a.submit_raw(accepted.clone()).unwrap();
    let mut refused = Vec::new();
    for k in 0..10 {
        let x = 2.0 + k as f32;
        for (client, body, code) in [
            (&a, message(&run, Codec::F32, 0, &base, &delta(x)), ErrorCode::Duplicate),
            (&c, message(&run, Codec::F32, 1, &base, &delta(x)), ErrorCode::FutureRound),
            (&c, message(&run, Codec::F32, 0, &"ab".repeat(32), &delta(x)), ErrorCode::BaseMismatch),
        ] {
            let (_, e) = client.submit_raw(body.clone()).unwrap_err();
            assert_eq!(e.code, code);
            refused.push(body);
        }
    }
    let store = tessera_hub::Store::open(&b.store).unwrap();
    let stored = |body: &[u8]| {
        let key = tessera_hub::store::submission_key(&hex::encode(&body[body.len() - 32..]));
        server.rt.block_on(store.size(&key)).is_ok()
    };
    assert!(stored(&accepted), "the accepted submission is kept");
    assert_eq!(refused.iter().filter(|b| stored(b)).count(), 0, "refused submissions left bytes");
    server.stop();
}

/// A finite but huge pseudo-gradient is refused on arrival: summed with another, or alone
/// through the outer step, it would overflow to infinity, and a round whose update cannot be
/// encoded would never publish (nor could the hub restart past it).
#[test]
fn huge_finite_values_are_refused_and_cannot_stop_the_run() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, spec(2));
    let url = server.url.clone();
    let run = info(&url);
    let (a, c) = (Client::register(&url, "a"), Client::register(&url, "c"));
    for scale in [5e37f32, 1e20] {
        let (s, e) = a.submit(&run, 0, &run.checkpoint, &delta(scale)).unwrap_err();
        assert_eq!((s, e.code), (StatusCode::BAD_REQUEST, ErrorCode::MalformedMessage), "{scale}");
        assert!(e.message.contains("beyond"), "{}", e.message);
    }
    a.submit(&run, 0, &run.checkpoint, &delta(1.0)).unwrap();
    c.submit(&run, 0, &run.checkpoint, &delta(2.0)).unwrap();
    let after = info(&url);
    assert_eq!(after.round, 1);
    let theta = weights(&url, &after.checkpoint, &run.spec.tensors);
    assert!(theta.iter().flatten().all(|v| v.is_finite()));
    server.stop();
}

/// The inner loss can end a phase early, so it is signed: it travels in the signed path, the
/// unsigned header of protocol 1 is refused, and a loss changed after signing breaks the
/// signature.
#[test]
fn the_inner_loss_is_covered_by_the_signature() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, spec(2));
    let url = server.url.clone();
    let run = info(&url);
    let (a, c) = (Client::register(&url, "a"), Client::register(&url, "c"));
    let body = message(&run, run.spec.codec, 0, &run.checkpoint, &delta(1.0));
    let mut h = a.signature("/v1/submissions", &body);
    h.push(("x-tessera-inner-loss", "0.01".into()));
    let r = post_signed(&a.hub, "/v1/submissions", &h, body.clone());
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.json::<ApiError>().unwrap().message.contains("signature"));
    let h = a.signature("/v1/submissions?inner_loss=0.7", &body);
    let r = post_signed(&a.hub, "/v1/submissions?inner_loss=0.01", &h, body.clone());
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "a changed loss must break the signature");
    let r = post_signed(&a.hub, "/v1/submissions?inner_loss=0.7", &h, body);
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let body = message(&run, run.spec.codec, 0, &run.checkpoint, &delta(2.0));
    let r = c.post("/v1/submissions?inner_loss=0.5", body);
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let st = status_of(&url);
    assert!(st.history[0].mean_inner_loss.is_some_and(|l| (l - 0.6).abs() < 1e-12), "{:?}", st.history[0]);
    server.stop();
}

#[test]
fn late_submissions_are_down_weighted_then_refused() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, RunSpec { rounds: 5, ..spec(1) });
    let url = server.url.clone();
    let run0 = info(&url);
    let (a, slow, slower) =
        (Client::register(&url, "a"), Client::register(&url, "slow"), Client::register(&url, "slower"));
    a.submit(&run0, 0, &run0.checkpoint, &delta(1.0)).unwrap();
    let run1 = info(&url);
    assert_eq!(run1.round, 1);
    // One round stale: accepted at half weight, and alone it makes round 1's whole update.
    let r = slow.submit(&run0, 0, &run0.checkpoint, &delta(2.0)).unwrap();
    assert_eq!((r.round, r.base_round, r.staleness, r.weight), (1, 0, 1, 0.5));
    let run2 = info(&url);
    assert_eq!(run2.round, 2);
    let (s, e) = slower.submit(&run0, 0, &run0.checkpoint, &delta(3.0)).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Stale));
    assert!(e.message.contains("2 rounds stale"), "{}", e.message);
    let t1 = weights(&url, &run1.checkpoint, &run0.spec.tensors);
    let t2 = weights(&url, &run2.checkpoint, &run0.spec.tensors);
    // A weighted mean of one submission is that submission, whatever its weight.
    let d = delta(2.0);
    assert!((t2[1][5] - (t1[1][5] - d[1][5])).abs() < 1e-6);
    server.stop();
}

#[test]
fn a_round_closes_at_its_deadline_without_the_missing() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, RunSpec { round_deadline_ms: 300, ..spec(3) });
    let url = server.url.clone();
    let run = info(&url);
    let a = Client::register(&url, "a");
    let _vanished = Client::register(&url, "vanished");
    a.submit(&run, 0, &run.checkpoint, &delta(1.0)).unwrap();
    let next = a.assignment(5_000);
    assert_eq!(next.round, 1, "the deadline should have closed round 0");
    let st = status_of(&url);
    assert_eq!(st.history[0].closed_by.as_deref(), Some("deadline"));
    assert_eq!(st.history[0].accepted, 1);
    server.stop();
}

/// A hub restarted mid-round keeps what it accepted; with no sum taken on arrival for the
/// round, it reads the round's blobs back at close and publishes the very checkpoint a hub that
/// never stopped publishes — which summed on arrival and read nothing back (its blobs are gone
/// before the round closes).
#[test]
fn a_restarted_hub_keeps_accepted_submissions_and_keys() {
    let spec3 = RunSpec { broadcast_codec: Codec::Int8 { block: 16 }, ..spec(3) };
    let deltas = [delta(1.0), delta(-3.1), delta(0.77)];
    let steady = {
        let b = backend("sqlite").unwrap();
        let server = Server::start(&b, spec3.clone());
        let run = info(&server.url);
        let clients: Vec<Client> = (0..3).map(|k| Client::register(&server.url, &format!("c{k}"))).collect();
        for (k, (c, d)) in clients.iter().zip(&deltas).enumerate() {
            if k == 2 {
                for blob in std::fs::read_dir(std::path::Path::new(&b.store).join("submissions")).unwrap() {
                    std::fs::remove_file(blob.unwrap().path()).unwrap();
                }
            }
            c.submit(&run, 0, &run.checkpoint, d).unwrap();
        }
        let after = info(&server.url);
        server.stop();
        after.checkpoint
    };

    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, spec3);
    let url = server.url.clone();
    let run = info(&url);
    let a = Client::register(&url, "a");
    let c = Client::register(&url, "c");
    let d = Client::register(&url, "d");
    a.submit(&run, 0, &run.checkpoint, &deltas[0]).unwrap();
    c.submit(&run, 0, &run.checkpoint, &deltas[1]).unwrap();
    server.stop();

    // The same database and store; the spec passed now is ignored in favour of the stored run.
    let server = Server::start(&b, spec(99));
    let url2 = server.url.clone();
    let resumed = info(&url2);
    assert_eq!((resumed.run_id.as_str(), resumed.spec.quorum), (run.run_id.as_str(), 3));
    assert_eq!(status_of(&url2).history[0].accepted, 0, "not closed yet");
    let d = Client::register_key(&url2, "d", d.key.clone());
    // A key registers once: registering again gets the same id.
    assert_eq!(Client::register_key(&url2, "d again", d.key.clone()).id, d.id);
    d.submit(&run, 0, &run.checkpoint, &deltas[2]).unwrap();
    let after = info(&url2);
    assert_eq!(after.round, 1);
    let st = status_of(&url2);
    assert_eq!(st.history[0].accepted, 3, "the submissions from before the restart count");
    assert_eq!(after.checkpoint, steady, "read back after a restart = summed on arrival, bit for bit");
    // With a lossy broadcast codec the update still reproduces the checkpoint exactly.
    let update = client(&url2).update(1).unwrap();
    let view = MessageView::parse(&update).unwrap();
    assert_eq!(view.codec, Codec::Int8 { block: 16 });
    let rebuilt = view.apply_to(&initial()).unwrap();
    let bytes = tessera_protocol::encode_weights(&run.spec.tensors, &rebuilt).unwrap();
    assert_eq!(hex::encode(weights_hash(&bytes)), after.checkpoint);
    drop((a, c));
    server.stop();
}

#[test]
fn the_run_finishes_after_its_rounds() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, RunSpec { rounds: 2, ..spec(1) });
    let url = server.url.clone();
    let a = Client::register(&url, "a");
    for round in 0..2 {
        let asg = a.assignment(0);
        assert_eq!((asg.round, asg.finished), (round, false));
        a.submit(&info(&url), round, &asg.base_checkpoint, &delta(0.1)).unwrap();
    }
    let asg = a.assignment(0);
    assert!(asg.finished);
    let run = info(&url);
    assert!(run.finished);
    // Every round's evaluation seed is public now; there is no round 2 to ask about.
    let seed: EvalSeed = client(&url).eval_seed(1).unwrap();
    assert!(seed.seed.is_some());
    assert_eq!(status(client(&url).eval_seed(2), StatusCode::OK), StatusCode::NOT_FOUND);
    let (s, e) = a.submit(&run, 1, &status_of(&url).history[1].base_checkpoint, &delta(0.1)).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::RunFinished));
    // Prometheus counts rounds and submissions by outcome (other tests in this process too).
    let metrics = client(&url).metrics().unwrap();
    for needle in [
        "tessera_hub_rounds_published_total",
        "outcome=\"accepted\"",
        "outcome=\"run_finished\"",
        "tessera_hub_aggregation_seconds_bucket",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from {metrics}");
    }
    std::thread::sleep(Duration::from_millis(10));
    server.stop();
}

/// A scored round end to end over HTTP: the seed commitment, its reveal when submissions close,
/// contributors told to retry while scoring, the validator's job and blobs behind its token,
/// scores checked against the job, exact rewards, ratings and the leaderboard — which survive a
/// restart — and a replayed message refused with a recorded reason.
fn scored_rounds(kind: &str) {
    let Some(b) = backend(kind) else { return };
    let contest = ContestSpec { reward_units: 1000, promote_top: 2, promote_at: Some(1), ..ContestSpec::default() };
    let spec = RunSpec { rounds: 3, aggregation: Aggregation::DEFAULT, contest: Some(contest), ..spec(3) };
    let server = Server::start(&b, spec.clone());
    let url = server.url.clone();
    let run = info(&url);
    // An unsealed scored run says what its operator is trusted with.
    let trusted = |what: &str| run.operator_trusted_with.iter().any(|t| t.starts_with(what));
    assert!(trusted("the evaluation seed") && trusted("the scores") && trusted("the submissions"), "{run:?}");
    let clients = [Client::register(&url, "a"), Client::register(&url, "b"), Client::register(&url, "c")];
    let late = Client::register(&url, "late");
    let commitment = clients[0].assignment(0).eval_commitment.expect("a scored run commits to its seed");
    let seed: EvalSeed = client(&url).eval_seed(0).unwrap();
    assert_eq!((seed.commitment.as_str(), seed.seed), (commitment.as_str(), None), "revealed before the round closed");
    assert_eq!(validator_get(&url, "/v1/validator/job", Some(VALIDATOR)).status(), StatusCode::NO_CONTENT);

    let bodies: Vec<Vec<u8>> =
        [0.1f32, 0.2, -0.3].iter().map(|&s| message(&run, run.spec.codec, 0, &run.checkpoint, &delta(s))).collect();
    for (c, body) in clients.iter().zip(&bodies) {
        c.submit_raw(body.clone()).unwrap();
    }
    // Quorum closed the submissions; the round waits for scores.
    assert_eq!(info(&url).round, 0);
    let (s, e) = late.submit(&run, 0, &run.checkpoint, &delta(0.05)).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Busy));
    let seed: EvalSeed = client(&url).eval_seed(0).unwrap();
    let mut seed_bytes = [0u8; 32];
    hex::decode_to_slice(seed.seed.expect("revealed once submissions closed"), &mut seed_bytes).unwrap();
    let mut commitment_bytes = [0u8; 32];
    hex::decode_to_slice(&commitment, &mut commitment_bytes).unwrap();
    assert!(tessera_contest::commit::verify(&commitment_bytes, &seed_bytes));

    assert_eq!(validator_get(&url, "/v1/validator/job", None).status(), StatusCode::UNAUTHORIZED);
    assert_eq!(validator_get(&url, "/v1/validator/job", Some("guess")).status(), StatusCode::UNAUTHORIZED);
    let job: ScoringJob = validator_get(&url, "/v1/validator/job", Some(VALIDATOR)).json().unwrap();
    assert_eq!(job.round, 0);
    let order: Vec<u64> = job.submissions.iter().map(|s| s.contributor).collect();
    assert_eq!(order, clients.iter().map(|c| c.id).collect::<Vec<_>>());
    let blob = validator_get(&url, &format!("/v1/validator/submissions/{}", job.submissions[1].blob), Some(VALIDATOR));
    assert_eq!(blob.bytes().unwrap().to_vec(), bodies[1]);
    let blob = validator_get(&url, &format!("/v1/validator/submissions/{}", job.submissions[1].blob), None);
    assert_eq!(blob.status(), StatusCode::UNAUTHORIZED);

    let score = |contributor, score| SubmissionScore {
        contributor,
        score,
        data_fit: Some(0.01),
        copy_of: None,
        score_se: None,
        norm_bound: None,
    };
    let mut report = ScoreReport {
        round: 0,
        scores: vec![score(clients[1].id, 0.01), score(clients[0].id, 0.02), score(clients[2].id, -0.5)],
        held_out_loss: Some(2.5),
        task: None,
        samples: Vec::new(),
    };
    assert_eq!(post_scores(&url, &report), StatusCode::CONFLICT, "scores out of the job's order");
    report.scores.swap(0, 1);
    report.scores[2].copy_of = Some(2);
    assert_eq!(post_scores(&url, &report), StatusCode::BAD_REQUEST, "a copy of itself");
    report.scores[2].copy_of = None;
    assert_eq!(post_scores(&url, &report), StatusCode::NO_CONTENT);
    assert_eq!(post_scores(&url, &report), StatusCode::CONFLICT, "the round is no longer scoring");
    let after = info(&url);
    assert_eq!(after.round, 1);
    // Only the two positive scores were aggregated: centred clipping of two inputs stays between them.
    let theta = weights(&url, &after.checkpoint, &spec.tensors);
    let (lo, hi) = (initial()[0][7] - 0.2 * 4.0, initial()[0][7] - 0.1 * 4.0);
    assert!((lo - 1e-5..=hi + 1e-5).contains(&theta[0][7]), "{} not in [{lo}, {hi}]", theta[0][7]);

    let board: Leaderboard = leaderboard(&url);
    // The never-rated contributor is listed apart, not ranked at the default rating.
    assert_eq!((board.unrated.len(), board.unrated[0].id, board.unrated[0].rank), (1, late.id, 0));
    let played: Vec<_> = board.rows.iter().collect();
    assert_eq!(played.iter().map(|r| r.id).collect::<Vec<_>>(), clients.iter().map(|c| c.id).collect::<Vec<_>>());
    let rewards: Vec<u64> = played.iter().map(|r| r.rewards).collect();
    // Shares ∝ score²: 0.02² : 0.01² = 4 : 1 of 1000 units; the negative score earns nothing.
    assert_eq!((rewards[0], rewards[1], rewards[2], rewards.iter().sum::<u64>()), (800, 200, 0, 1000));
    // Each reward is explained by its numbers, and the round's published rows give it again.
    let explained = client(&url).rewards(clients[0].id, 10).unwrap();
    assert_eq!(explained.len(), 1);
    let e = &explained[0];
    assert_eq!((e.round, e.reward, e.round_units, e.fit_factor, e.flag.as_deref()), (0, 800, 1000, Some(1.0), None));
    assert!(e.reproduced && (e.share / e.round_shares - 0.8).abs() < 1e-9, "{e:?}");
    assert!(e.formula.contains("score 0.020000") && e.formula.contains("→ 800"), "{}", e.formula);
    let e = &client(&url).rewards(clients[2].id, 10).unwrap()[0];
    assert_eq!((e.reward, e.share, e.flag.as_deref()), (0, 0.0, Some("not_positive")));
    assert!(e.reproduced && e.formula.contains("did not lower the held-out loss"), "{}", e.formula);
    assert!(client(&url).rewards(late.id, 10).unwrap().is_empty());
    // What the round can be audited from, signed; its submissions stay private in a run that
    // does not publish them, and the open round is not published at all.
    let pinned = client(&url).pinning(tessera_trust::PublicKey::parse(&run.hub_key).unwrap());
    let audit = pinned.round_audit(0).unwrap();
    assert_eq!((audit.job.round, audit.job.base_checkpoint.as_str()), (0, run.checkpoint.as_str()));
    assert_eq!(audit.job.eval_seed, hex::encode(seed_bytes));
    assert_eq!(audit.scores.iter().map(|s| s.reward).collect::<Vec<_>>(), vec![800, 200, 0]);
    assert!(!audit.submissions_published);
    assert!(client(&url).published_submission(0, &job.submissions[0].blob).is_err());
    assert!(pinned.round_audit(1).is_err(), "round 1 is not published");
    // Round 0 was the phase boundary: the top two qualified, and the run goes on.
    assert!(board.promoted && board.promote_at == 1);
    let qualified: Vec<u64> = board.rows.iter().filter(|r| r.qualified).map(|r| r.id).collect();
    assert_eq!(qualified, vec![clients[0].id, clients[1].id]);

    // Round 1: someone else's round-0 bytes (staleness 1 would be accepted) are a replay, refused
    // and recorded; its own bytes again are its accepted submission (what a retry after a lost
    // answer sends); being told to retry while scoring was not a refusal.
    let (s, e) = clients[1].submit_raw(bodies[0].clone()).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Replay));
    let (s, e) = clients[0].submit_raw(bodies[0].clone()).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Duplicate));
    let st = status_of(&url);
    let rejected = |id: u64| st.contributors.iter().find(|c| c.id == id).map(|c| c.rejected);
    assert_eq!((rejected(clients[1].id), rejected(late.id)), (Some(1), Some(0)));
    let board: Leaderboard = leaderboard(&url);
    server.stop();

    // Ratings, rewards and the leaderboard come back after a restart.
    let server = Server::start(&b, spec.clone());
    let board2: Leaderboard = leaderboard(&server.url);
    assert_eq!(board2.rows, board.rows);

    // The replay counts against its sender after the restart too: rounds 1 and 2 score everyone
    // alike, and in round 2 its share is discounted by its conduct record (two rounds, caught
    // in one: (3/4)^4), which its explanation names.
    let url = server.url.clone();
    // The same keys, talking to the restarted hub.
    let again: Vec<Client> = clients.iter().map(|c| Client::register_key(&url, "again", c.key.clone())).collect();
    assert!(again.iter().zip(&clients).all(|(a, c)| a.id == c.id));
    for round in 1..3u64 {
        let base = info(&url).checkpoint;
        for (i, c) in again.iter().enumerate() {
            c.submit_raw(message(&run, run.spec.codec, round, &base, &delta(0.1 + 0.01 * i as f32))).unwrap();
        }
        let job: ScoringJob = validator_get(&url, "/v1/validator/job", Some(VALIDATOR)).json().unwrap();
        let report = ScoreReport {
            round,
            scores: job.submissions.iter().map(|s| score(s.contributor, 0.01)).collect(),
            held_out_loss: Some(2.5),
            task: None,
            samples: Vec::new(),
        };
        assert_eq!(post_scores(&url, &report), StatusCode::NO_CONTENT);
    }
    let last = |id: u64| client(&url).rewards(id, 1).unwrap().remove(0);
    let (cheat, honest) = (last(clients[1].id), last(clients[0].id));
    assert_eq!((cheat.round, honest.round), (2, 2));
    let kept = 0.75f64.powi(4);
    assert!((cheat.conduct.unwrap() - kept).abs() < 1e-9 && honest.conduct == Some(1.0), "{cheat:?} {honest:?}");
    assert!(cheat.formula.contains("conduct record 0.316") && cheat.reproduced, "{}", cheat.formula);
    assert!(cheat.reward < honest.reward / 3);
    server.stop();
}

#[test]
fn scored_rounds_sqlite() {
    scored_rounds("sqlite");
}

#[test]
fn scored_rounds_postgres() {
    scored_rounds("postgres");
}

/// A scored round whose validator never reports is aggregated unscored after its timeout:
/// staleness weights, no rewards, ratings unchanged — and nobody penalised for it: a
/// contributor refused in that round (which would place it last in a scored round) stays
/// unrated too.
#[test]
fn scores_that_never_come() {
    let b = backend("sqlite").unwrap();
    let contest = ContestSpec { score_timeout_ms: 400, ..ContestSpec::default() };
    let server = Server::start(&b, RunSpec { contest: Some(contest), ..spec(1) });
    let url = server.url.clone();
    let run = info(&url);
    let a = Client::register(&url, "a");
    let refused = Client::register(&url, "refused");
    let (_, e) = refused.submit(&run, 0, &"00".repeat(32), &delta(0.1)).unwrap_err();
    assert!(tessera_round::counts_against_sender(e.code), "{e:?} would not place it last anyway");
    a.submit(&run, 0, &run.checkpoint, &delta(0.1)).unwrap();
    assert_eq!(info(&url).round, 0, "waiting for scores");
    server.rt.block_on(server.hub.tick()).unwrap();
    assert_eq!(info(&url).round, 0, "not yet timed out");
    std::thread::sleep(Duration::from_millis(500));
    server.rt.block_on(server.hub.tick()).unwrap();
    let after = info(&url);
    assert_eq!(after.round, 1);
    let theta = weights(&url, &after.checkpoint, &run.spec.tensors);
    assert!((theta[0][7] - (initial()[0][7] - 0.4)).abs() < 1e-6, "the unscored mean was applied");
    let board: Leaderboard = leaderboard(&url);
    assert!(board.rows.is_empty(), "a round whose scoring failed rated someone: {:?}", board.rows);
    let unrated: Vec<(u64, u64, u64)> = board.unrated.iter().map(|r| (r.id, r.rounds, r.rewards)).collect();
    assert_eq!(unrated, vec![(a.id, 0, 0), (refused.id, 0, 0)]);
    let e = &client(&url).rewards(a.id, 10).unwrap()[0];
    assert_eq!((e.flag.as_deref(), e.reward, e.reproduced), (Some("unscored"), 0, true));
    assert!(e.formula.contains("nobody in the round was rated, rewarded or penalised"), "{}", e.formula);
    server.stop();
}

/// A validator that cannot score a round says so, and the round is aggregated unscored at once
/// instead of waiting out its score timeout: nobody in it rated, flagged or paid, the cause in
/// how it closed. Only the validator may say it, and only of the round waiting for scores.
#[test]
fn a_failed_validator_ends_its_round_unscored_at_once() {
    let b = backend("sqlite").unwrap();
    let contest = ContestSpec { score_timeout_ms: 3_600_000, ..ContestSpec::default() };
    let server = Server::start(&b, RunSpec { contest: Some(contest), ..spec(2) });
    let url = server.url.clone();
    let run = info(&url);
    let (a, b2) = (Client::register(&url, "a"), Client::register(&url, "b"));
    a.submit(&run, 0, &run.checkpoint, &delta(0.1)).unwrap();
    let validator = client(&url).with_validator_token(VALIDATOR);
    assert!(validator.post_failure(0, "too early").is_err(), "round 0 is still collecting");
    b2.submit(&run, 0, &run.checkpoint, &delta(0.2)).unwrap();
    assert_eq!(info(&url).round, 0, "waiting for scores");
    assert!(client(&url).post_failure(0, "not the validator").is_err(), "no token");
    assert!(validator.post_failure(1, "wrong round").is_err());
    validator.post_failure(0, "device lost\u{7}").unwrap();
    assert_eq!(info(&url).round, 1, "aggregated at once, not after an hour");
    let history = &status_of(&url).history;
    let closed_by = history[0].closed_by.clone().unwrap_or_default();
    assert_eq!(closed_by, "quorum (validator failed: device lost)");
    let board: Leaderboard = leaderboard(&url);
    assert!(board.rows.is_empty() && board.unrated.len() == 2, "{board:?}");
    let e = &client(&url).rewards(a.id, 10).unwrap()[0];
    assert_eq!((e.flag.as_deref(), e.reward), (Some("unscored"), 0));
    server.stop();
}

/// Many validators share a round: its 16 submissions are split into two tasks, each scored
/// twice (a double share of 1). One validator takes a task and vanishes: its task goes to the
/// others once its lease ends. One lies (inflated scores): each time, a third validator agrees
/// with the honest one, the liar's numbers never reach the round, and each of its
/// contradicted results is a hub-signed fault entry in the ledger.
#[test]
fn many_validators_share_a_round_outvote_a_liar_and_take_over_a_vanished_ones_task() {
    many_validators("sqlite");
}

#[test]
fn many_validators_postgres() {
    many_validators("postgres");
}

fn many_validators(kind: &str) {
    use tessera_protocol::api::TaskSpec;
    let Some(b) = backend(kind) else { return };
    let tasks = TaskSpec { size: 8, double_share: 1.0, lease_ms: 400, ..TaskSpec::default() };
    let contest = ContestSpec { score_timeout_ms: 3_600_000, tasks: Some(tasks), ..ContestSpec::default() };
    let tokens = [("liar", "tok-liar"), ("b", "tok-b"), ("gone", "tok-gone")];
    let config = HubConfig {
        validator_token: Some(VALIDATOR.into()),
        validator_tokens: tokens.iter().map(|(n, t)| ((*n).into(), (*t).into())).collect(),
        ..HubConfig::default()
    };
    let server = Server::start_with(&b, RunSpec { contest: Some(contest), ..spec(16) }, initial(), config);
    let url = server.url.clone();
    let run = info(&url);
    let clients: Vec<Client> = (0..16).map(|i| Client::register(&url, &format!("c{i}"))).collect();
    for (i, c) in clients.iter().enumerate() {
        c.submit(&run, 0, &run.checkpoint, &delta(0.01 * (i + 1) as f32)).unwrap();
    }
    let honest = |contributor: u64| 0.001 * contributor as f64;
    let sample = |contributor: u64| -> Vec<f32> {
        (0..64u64).map(|k| ((k * 31 + contributor * 17) % 23) as f32 - 11.0).collect()
    };
    let report = |job: &ScoringJob, lie: f64| ScoreReport {
        round: job.round,
        scores: job
            .submissions
            .iter()
            .map(|s| SubmissionScore {
                contributor: s.contributor,
                score: honest(s.contributor) + lie,
                data_fit: Some(0.0),
                copy_of: None,
                score_se: None,
                norm_bound: None,
            })
            .collect(),
        held_out_loss: Some(2.0),
        task: job.task.as_ref().map(|t| t.id),
        samples: job.submissions.iter().map(|s| tessera_contest::tasks::sample_hex(&sample(s.contributor))).collect(),
    };
    let v = |token: &str| client(&url).with_validator_token(token);
    let gone = v("tok-gone").job().unwrap().expect("a task for the first validator to ask");
    assert_eq!(gone.task.as_ref().unwrap().tasks, 2);
    assert_eq!(gone.submissions.len(), 8);
    // A task run takes no whole-round report, and a task's scores must be its submissions'.
    let mut whole = report(&gone, 0.0);
    whole.task = None;
    assert!(v(VALIDATOR).post_scores(&whole).is_err());
    let mut short = report(&gone, 0.0);
    short.scores.pop();
    short.samples.pop();
    assert!(v(VALIDATOR).post_scores(&short).is_err());
    let started = std::time::Instant::now();
    let mut lies = 0;
    while info(&url).round == 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "the round never closed");
        for (token, lie) in [("tok-liar", 0.5), (VALIDATOR, 0.0), ("tok-b", 0.0)] {
            if let Some(job) = v(token).job().unwrap() {
                v(token).post_scores(&report(&job, lie)).unwrap();
                lies += usize::from(lie > 0.0);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        server.rt.block_on(server.hub.tick()).unwrap();
    }
    // The vanished validator's result comes too late: the round has moved on.
    assert!(v("tok-gone").post_scores(&report(&gone, 0.0)).is_err());
    for c in &clients {
        let e = &client(&url).rewards(c.id, 1).unwrap()[0];
        let off = (e.score.unwrap() - honest(c.id)).abs();
        assert!(off < 1e-12, "contributor {}: the liar's number reached the round ({:?})", c.id, e.score);
    }
    let bytes = client(&url).ledger(0).unwrap();
    let ledger = tessera_trust::ledger::Ledger::from_bytes(&bytes).unwrap();
    assert_eq!(ledger.faults.len(), 1, "{:?}", ledger.faults);
    assert!(lies >= 1, "the liar scored no task");
    assert_eq!(ledger.faults.get("liar"), Some(&(lies as u64)), "one fault per task it scored: {:?}", ledger.faults);
    server.stop();
}

/// A layer-sharded run: each contributor submits only its fragment (its layers plus the shared
/// tensors); the whole model is refused; each tensor is averaged over the submissions that
/// carry it.
#[test]
fn layer_sharded_rounds_average_each_tensor_over_its_trainers() {
    let b = backend("sqlite").unwrap();
    let tensors = vec![
        TensorSpec { name: "model.layers.0.w".into(), shape: vec![4] },
        TensorSpec { name: "model.layers.1.w".into(), shape: vec![4] },
        TensorSpec { name: "model.norm.weight".into(), shape: vec![4] },
    ];
    let sharded = RunSpec { tensors, fragments: 2, ..spec(2) };
    sharded.validate().unwrap();
    assert!(RunSpec { fragments: 3, ..sharded.clone() }.validate().unwrap_err().contains("fragments"));
    let server = Server::start_with(&b, sharded, vec![vec![1.0; 4]; 3], HubConfig::default());
    let url = server.url.clone();
    let run = info(&url);
    let (a, c) = (Client::register(&url, "a"), Client::register(&url, "c"));
    let (fa, fc) = (a.assignment(0).fragment, c.assignment(0).fragment);
    assert_eq!((fa, fc), (Some(0), Some(1)));
    let partial = |keep: &[usize], values: &[f32]| {
        let mut run_id = [0u8; 16];
        hex::decode_to_slice(&run.run_id, &mut run_id).unwrap();
        let mut base = [0u8; 32];
        hex::decode_to_slice(&run.checkpoint, &mut base).unwrap();
        let deltas: Vec<Vec<f32>> = values.iter().map(|&v| vec![v; 4]).collect();
        let t = keep
            .iter()
            .zip(&deltas)
            .map(|(&i, d)| (run.spec.tensors[i].name.as_str(), run.spec.tensors[i].shape.as_slice(), d.as_slice()));
        PseudoGradient::build(Codec::F32, run_id, 0, base, t).unwrap().to_bytes()
    };
    // The whole model, or another fragment's tensors, is not this contributor's fragment.
    let (_, e) = a.submit(&run, 0, &run.checkpoint, &[vec![0.1; 4], vec![0.1; 4], vec![0.1; 4]]).unwrap_err();
    assert_eq!(e.code, ErrorCode::TensorMismatch);
    let (_, e) = a.submit_raw(partial(&[1, 2], &[0.1, 0.1])).unwrap_err();
    assert_eq!(e.code, ErrorCode::TensorMismatch);
    a.submit_raw(partial(&[0, 2], &[0.5, 0.25])).unwrap();
    c.submit_raw(partial(&[1, 2], &[0.75, -0.25])).unwrap();
    let after = info(&url);
    assert_eq!(after.round, 1);
    let theta = weights(&url, &after.checkpoint, &run.spec.tensors);
    // Outer lr 1, no momentum: θ − mean, each tensor over those that trained it.
    assert_eq!((theta[0][0], theta[1][0], theta[2][0]), (0.5, 0.25, 1.0));
    server.stop();
}

/// A run that grows needs its grower from the start: opening one without it fails at once,
/// naming what is missing, not at the phase boundary rounds later.
#[test]
fn a_run_with_phases_does_not_open_without_a_grower() {
    let b = backend("sqlite").unwrap();
    let later = tessera_protocol::api::PhaseSpec {
        name: "two".into(),
        model: serde_json::json!({}),
        tensors: spec(1).tensors,
        rounds: 2,
        seed: 1,
        qualify_top: None,
        until_loss: None,
    };
    let phased = RunSpec { rounds: 4, phases: vec![later], ..spec(1) };
    phased.validate().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let opened = rt.block_on(async {
        let db = Db::connect(&b.db).await.unwrap();
        let store = Store::open(&b.store).unwrap();
        let key = tessera_trust::Identity::load_or_create(&b.key).unwrap();
        Hub::open(db, store, Some(NewRun { spec: phased, weights: initial() }), key, HubConfig::default()).await
    });
    let e = opened.err().expect("a phased run without a grower must not open").to_string();
    assert!(e.contains("grower"), "{e}");
}

/// With an S3 store the bytes bypass the hub: a submission goes up on URLs the hub presigns
/// (here a multipart upload, its parts above S3's 5 MiB minimum) and is checked when committed;
/// downloads are redirects into the bucket; bytes that do not hash to their name are refused and
/// deleted. Where the server checks signatures (`TESSERA_TEST_S3_SIGNED=1`: s3s-fs, not moto), a
/// forged URL and bytes other than the granted checksum are refused by the bucket itself.
#[test]
fn direct_transfers_s3() {
    let Some(b) = backend("s3") else { return };
    let n = 3 << 20; // 12 MiB of f32 per submission
    let spec =
        RunSpec { tensors: vec![TensorSpec { name: "w".into(), shape: vec![n as u64] }], codec: Codec::F32, ..spec(2) };
    let weights = vec![(0..n).map(|i| (i % 1000) as f32 * 1e-3).collect::<Vec<f32>>()];
    let config = HubConfig { direct_multipart: Some((8 << 20, 5 << 20)), ..HubConfig::default() };
    let server = Server::start_with(&b, spec, weights.clone(), config);
    let url = server.url.clone();
    let run = info(&url);
    let (a, c) = (Client::register(&url, "a"), Client::register(&url, "c"));
    let body = |scale: f32| {
        let delta = vec![(0..n).map(|i| scale * ((i % 7) as f32 - 3.0) * 1e-3).collect::<Vec<f32>>()];
        message(&run, Codec::F32, 0, &run.checkpoint, &delta)
    };

    // A grant: three presigned parts into the bucket, none through the hub.
    let first = body(1.0);
    let blob = tessera_client::blob_name(&first);
    let request = serde_json::to_vec(&serde_json::json!({
        "blob": blob, "bytes": first.len(), "sha256": sha256_hex(&first),
    }))
    .unwrap();
    let grant: serde_json::Value = a.post("/v1/uploads", request).json().unwrap();
    let parts = grant["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 3, "{grant}");
    assert!(grant["upload_id"].is_string());
    let endpoint = std::env::var("AWS_ENDPOINT").unwrap();
    assert!(parts.iter().all(|p| p["url"].as_str().unwrap().starts_with(&endpoint)), "{grant}");

    // Junk under a valid grant: refused when committed, and gone from the bucket.
    let store = Store::open(&b.store).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let junk = vec![7u8; 1 << 20];
    let (s, e) = a.submit_raw(junk.clone()).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::BAD_REQUEST, ErrorCode::MalformedMessage), "{}", e.message);
    let junk_key = tessera_hub::store::submission_key(&tessera_client::blob_name(&junk));
    assert!(rt.block_on(store.size(&junk_key)).is_err(), "refused bytes stay in the bucket");

    // The real thing, through the client: multipart, committed, counted.
    a.submit_raw(first.clone()).unwrap();
    let stored = rt.block_on(store.get(&tessera_hub::store::submission_key(&blob))).unwrap();
    assert_eq!(stored.as_ref(), &first[..]);
    c.submit_raw(body(-2.0)).unwrap();
    let after = info(&url);
    assert_eq!(after.round, 1);

    // Downloads are redirects into the bucket; the client follows them and checks the hash.
    let no_redirects =
        reqwest::blocking::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = no_redirects.get(format!("{url}/v1/checkpoints/{}", after.checkpoint)).send().unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert!(r.headers()["location"].to_str().unwrap().starts_with(&endpoint));
    let bytes = client(&url).checkpoint(&after.checkpoint, None).unwrap();
    assert_eq!(hex::encode(weights_hash(&bytes)), after.checkpoint);
    let (status, part) = client(&url).checkpoint_range(&after.checkpoint, "bytes=100-199").unwrap();
    assert_eq!((status, &part[..]), (StatusCode::PARTIAL_CONTENT, &bytes[100..200]));

    if std::env::var("TESSERA_TEST_S3_SIGNED").is_ok_and(|v| v == "1") {
        // Round 1: a single-PUT grant (under the multipart threshold: a smaller codec).
        let small = message(&after, Codec::Int8 { block: 64 }, 1, &after.checkpoint, &[vec![0.5; n]]);
        let blob = tessera_client::blob_name(&small);
        let request = serde_json::to_vec(&serde_json::json!({
            "blob": blob, "bytes": small.len(), "sha256": sha256_hex(&small),
        }))
        .unwrap();
        let grant: serde_json::Value = a.post("/v1/uploads", request.clone()).json().unwrap();
        let part = &grant["parts"][0];
        let put = |url: &str, bytes: Vec<u8>| {
            let mut req = no_redirects.put(url);
            for h in part["headers"].as_array().unwrap() {
                req = req.header(h[0].as_str().unwrap(), h[1].as_str().unwrap());
            }
            req.body(bytes).send().unwrap().status()
        };
        let signed = part["url"].as_str().unwrap();
        let at = signed.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
        let flipped = if &signed[at..at + 1] == "0" { "1" } else { "0" };
        let forged = format!("{}{flipped}{}", &signed[..at], &signed[at + 1..]);
        // (A short body: the server answers before reading one, and may hang up on a long one.)
        assert_eq!(put(&forged, small[..64].to_vec()), StatusCode::FORBIDDEN, "a forged signature");
        let mut other = small.clone();
        other[40] ^= 1;
        let status = put(signed, other);
        assert!(status.is_client_error(), "bytes other than the granted checksum: {status}");
        // A store may keep bytes it refused (s3s-fs does): asking again clears them.
        let grant: serde_json::Value = a.post("/v1/uploads", request).json().unwrap();
        let signed = grant["parts"][0]["url"].as_str().unwrap();
        let status = put(signed, small.clone());
        assert!(status.is_success(), "{status}");
        assert_eq!(put(signed, small[..64].to_vec()), StatusCode::PRECONDITION_FAILED, "no overwrite");
    } else {
        eprintln!("SKIPPED: forged presigned requests (set TESSERA_TEST_S3_SIGNED=1 with a server that checks them)");
    }
    server.stop();
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Two hub replicas on one PostgreSQL database and one store, behind no balancer at all:
/// contributors register and submit through either, concurrently; each round closes and
/// publishes exactly once, with every accepted submission, and gives the checkpoint one hub
/// gives for the same submissions in the same order. A replica stopped mid-round loses nothing:
/// the other finishes the round, and a long-poll on it wakes when the round publishes.
#[test]
fn replicas_share_one_postgres() {
    let Some(b) = backend("postgres") else { return };
    let spec4 = spec(4);
    let (one, two) = (Server::start(&b, spec4.clone()), Server::start(&b, spec4.clone()));
    let urls = [one.url.clone(), two.url.clone()];
    let run = info(&urls[0]);
    assert_eq!(info(&urls[1]).run_id, run.run_id, "the second replica serves the run the first created");
    // Registered through alternating replicas: ids are dense and unique.
    let clients: Vec<Client> = (0..8).map(|k| Client::register(&urls[k % 2], &format!("c{k}"))).collect();
    let mut ids: Vec<u64> = clients.iter().map(|c| c.id).collect();
    ids.sort();
    assert_eq!(ids, (0..8).collect::<Vec<u64>>());
    // A client of the other replica, with the same key.
    let via = |c: &Client, k: usize| Client {
        hub: client(&urls[k % 2]).signed_by(c.key.clone()),
        id: c.id,
        key: c.key.clone(),
    };

    // Round 0: eight contributors at once, half through each replica; quorum 4 closes it
    // once, the rest is busy (retried by the client) or counts in round 1.
    let deltas: Vec<Vec<Vec<f32>>> = (0..8).map(|k| delta(0.25 * k as f32 - 1.0)).collect();
    std::thread::scope(|s| {
        for (k, c) in clients.iter().enumerate() {
            let (run, d, c) = (&run, &deltas[k], via(c, k));
            s.spawn(move || {
                let hub = c.hub.clone().with_patience(Duration::from_secs(30));
                let body = message(run, run.spec.codec, 0, &run.checkpoint, d);
                hub.submit(Arc::new(body), None, None).unwrap();
            });
        }
    });
    let wait_round = |url: &str, r: u64| {
        for _ in 0..200 {
            if info(url).round >= r {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{url} never reached round {r}");
    };
    wait_round(&urls[0], 2);
    wait_round(&urls[1], 2);
    let st = status_of(&urls[1]);
    assert_eq!(
        st.history.iter().filter(|h| h.result_checkpoint.is_some()).count(),
        2,
        "two rounds, published once each"
    );
    assert_eq!(st.history[0].accepted + st.history[1].accepted, 8, "every submission counted once");
    assert_eq!(info(&urls[0]).checkpoint, info(&urls[1]).checkpoint);

    // Round 2: the same submissions in the same order through one hub and through the two
    // replicas give the same checkpoint.
    let now = info(&urls[0]);
    let single = {
        let b1 = backend("sqlite").unwrap();
        let server = Server::start(&b1, spec4.clone());
        let run1 = info(&server.url);
        let cs: Vec<Client> = (0..4).map(|k| Client::register(&server.url, &format!("s{k}"))).collect();
        // Round 0 there from the same base: equal inputs, equal outputs.
        for (k, c) in cs.iter().enumerate() {
            c.submit(&run1, 0, &run1.checkpoint, &deltas[k]).unwrap();
        }
        let after = info(&server.url).checkpoint;
        server.stop();
        after
    };
    let b2 = backend("postgres").unwrap();
    let (r1, r2) = (Server::start(&b2, spec4.clone()), Server::start(&b2, spec4));
    let pair = [r1.url.clone(), r2.url.clone()];
    let run2 = info(&pair[0]);
    let cs: Vec<Client> = (0..4).map(|k| Client::register(&pair[k % 2], &format!("p{k}"))).collect();
    for (k, c) in cs.iter().enumerate().take(2) {
        c.submit(&run2, 0, &run2.checkpoint, &deltas[k]).unwrap();
    }
    // One replica stops mid-round; a long-poll on the other waits for the round to publish.
    r1.stop();
    let hub_key = tessera_trust::PublicKey::parse(&run2.hub_key).unwrap();
    let waiter = client(&pair[1]).signed_by(cs[0].key.clone()).pinning(hub_key);
    let polled = std::thread::spawn(move || waiter.assignment(Duration::from_secs(20)).unwrap().round);
    std::thread::sleep(Duration::from_millis(300));
    for (k, c) in cs.iter().enumerate().skip(2) {
        let c = Client { hub: client(&pair[1]).signed_by(c.key.clone()), id: c.id, key: c.key.clone() };
        c.submit(&run2, 0, &run2.checkpoint, &deltas[k]).unwrap();
    }
    assert_eq!(polled.join().unwrap(), 1, "the long-poll woke with the next round");
    let after = info(&pair[1]);
    assert_eq!((after.round, status_of(&pair[1]).history[0].accepted), (1, 4));
    assert_eq!(after.checkpoint, single, "two replicas, one stopped mid-round = one hub, bit for bit");
    drop(now);
    r2.stop();
    one.stop();
    two.stop();
}

/// Published checkpoints whose blobs were lost are rebuilt from the one before and the update
/// between (checked against their names): a download of one gets it back, and a hub restarted
/// with its current checkpoint gone aggregates on and finishes the run. The first checkpoint,
/// which no update produced, is reported lost rather than guessed.
#[test]
fn lost_checkpoints_are_rebuilt_from_their_updates() {
    let b = backend("sqlite").unwrap();
    let spec = RunSpec { rounds: 4, broadcast_codec: Codec::Int8 { block: 16 }, ..spec(1) };
    let server = Server::start(&b, spec.clone());
    let url = server.url.clone();
    let a = Client::register(&url, "a");
    let mut published = Vec::new();
    for round in 0..3 {
        let asg = a.assignment(0);
        published.push(asg.base_checkpoint.clone());
        a.submit(&info(&url), round, &asg.base_checkpoint, &delta(0.1 * (round + 1) as f32)).unwrap();
    }
    let current = info(&url).checkpoint;
    let path = |hash: &str| std::path::Path::new(&b.store).join(tessera_hub::checkpoint_key(hash));
    let saved: Vec<Vec<u8>> =
        published[1..].iter().chain([&current]).map(|h| std::fs::read(path(h)).unwrap()).collect();
    // Rounds 1 and 2's checkpoints go; a download of round 2's walks back to round 0's.
    std::fs::remove_file(path(&published[1])).unwrap();
    std::fs::remove_file(path(&published[2])).unwrap();
    let got = client(&url).checkpoint(&published[2], None).unwrap();
    assert_eq!(got, saved[1]);
    assert_eq!(std::fs::read(path(&published[1])).unwrap(), saved[0], "rebuilt on the way");
    server.stop();

    // The current checkpoint goes while the hub is down: it opens, rebuilds it, finishes.
    std::fs::remove_file(path(&current)).unwrap();
    let server = Server::start(&b, spec);
    let url = server.url.clone();
    assert_eq!(std::fs::read(path(&current)).unwrap(), saved[2]);
    let a = Client::register_key(&url, "a", a.key.clone());
    let asg = a.assignment(0);
    assert_eq!(asg.base_checkpoint, current);
    a.submit(&info(&url), 3, &asg.base_checkpoint, &delta(0.5)).unwrap();
    assert!(info(&url).finished);
    // The first checkpoint cannot be rebuilt: still a plain 404.
    std::fs::remove_file(path(&published[0])).unwrap();
    let (s, e) = refused(client(&url).checkpoint(&published[0], None).unwrap_err());
    assert_eq!((s, e.code), (StatusCode::NOT_FOUND, ErrorCode::NotFound));
    server.stop();
}

/// Every connection the replicas hold to PostgreSQL dies at once (what a database restart or
/// failover does to them, the listeners' included): requests in flight fail and are retried,
/// nothing acknowledged is lost or counted twice, and the run goes on.
#[test]
fn replicas_survive_losing_every_database_connection() {
    let Some(b) = backend("postgres") else { return };
    let (one, two) = (Server::start(&b, spec(4)), Server::start(&b, spec(4)));
    let urls = [one.url.clone(), two.url.clone()];
    let run = info(&urls[0]);
    let patient = |c: &Client| c.hub.clone().with_patience(Duration::from_secs(20));
    let clients: Vec<Client> = (0..4).map(|k| Client::register(&urls[k % 2], &format!("c{k}"))).collect();
    for (k, c) in clients.iter().enumerate().take(2) {
        c.submit(&run, 0, &run.checkpoint, &delta(k as f32)).unwrap();
    }
    let database = b.db.rsplit('/').next().unwrap().to_owned();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let admin = sqlx::AnyPool::connect(&std::env::var("TESSERA_TEST_POSTGRES").unwrap()).await.unwrap();
        let killed =
            sqlx::query("SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE datname = $1")
                .bind(&database)
                .fetch_one(&admin)
                .await
                .unwrap();
        assert!(sqlx::Row::get::<i64, _>(&killed, "n") >= 2, "the replicas' connections were terminated");
    });
    for (k, c) in clients.iter().enumerate().skip(2) {
        let body = message(&run, run.spec.codec, 0, &run.checkpoint, &delta(k as f32));
        patient(c).submit(Arc::new(body), None, None).unwrap();
    }
    // The other replica learns of the publication when notified, or at its next tick: under
    // load that is not at once.
    let mut after = info(&urls[1]);
    for _ in 0..200 {
        if after.round >= 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        after = info(&urls[1]);
    }
    assert_eq!(after.round, 1);
    assert_eq!(status_of(&urls[0]).history[0].accepted, 4, "every acknowledged submission, once");
    // The next round, across both replicas again (the listeners reconnected).
    for (k, c) in clients.iter().enumerate() {
        let body = message(&after, after.spec.codec, 1, &after.checkpoint, &delta(0.1 * k as f32));
        patient(c).submit(Arc::new(body), None, None).unwrap();
    }
    let hub_key = tessera_trust::PublicKey::parse(&run.hub_key).unwrap();
    let asg = client(&urls[0]).signed_by(clients[0].key.clone()).pinning(hub_key).assignment(Duration::from_secs(5));
    assert_eq!(asg.unwrap().round, 2);
    one.stop();
    two.stop();
}

/// A hub with `--aggregate-shards 2` and two aggregation workers (PostgreSQL, S3) publishes,
/// round after round, the checkpoints one hub aggregating itself publishes, bit for bit: the
/// plain mean (one stage) and centred clipping (three stages, partial sums between them), from
/// int8 submissions with momentum, both reading the submissions a few blocks at a time. A worker that dies holding a job, having stored a wrong
/// part, leaves the job to the next worker, which redoes it: nothing counted twice.
#[test]
fn aggregation_workers_publish_what_one_hub_publishes() {
    for rule in ["mean", "centered-clip:1:2"] {
        let Some(b) = backend("s3") else { return };
        let Some(pg) = backend("postgres") else { return };
        let b = Backend { db: pg.db.clone(), ..b };
        let spec = RunSpec {
            codec: Codec::Int8 { block: 8 },
            broadcast_codec: Codec::Int8 { block: 8 },
            outer: tessera_protocol::api::OuterSpec { lr: 0.7, momentum: 0.9, nesterov: true },
            aggregation: rule.parse().unwrap(),
            ..spec(3)
        };
        let local = backend("sqlite").unwrap();
        // Room for one block of each of the three submissions under centred clipping (pieces
        // start inside tensors) and five of one under the mean (a piece spans both tensors):
        // every stage reads piece by piece, here and in the workers.
        let base =
            HubConfig { validator_token: Some(VALIDATOR.into()), aggregate_memory: Some(160), ..HubConfig::default() };
        let one = Server::start_with(&local, spec.clone(), initial(), base.clone());
        let config = HubConfig { aggregate_shards: 2, ..base };
        let sharded = Server::start_with(&b, spec, initial(), config);
        let urls = [one.url.clone(), sharded.url.clone()];
        let clients: Vec<Vec<Client>> =
            urls.iter().map(|u| (0..3).map(|k| Client::register(u, &format!("c{k}"))).collect()).collect();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (db, store) = rt.block_on(async {
            (tessera_hub::Db::connect(&b.db).await.unwrap(), tessera_hub::Store::open(&b.store).unwrap())
        });
        let (db, store) = (Arc::new(db), Arc::new(store));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut workers = Vec::new();
        for round in 0..2u64 {
            let deltas: Vec<Vec<Vec<f32>>> = (0..3).map(|k| delta(0.3 * k as f32 - 0.4 + 0.1 * round as f32)).collect();
            let mut published = Vec::new();
            for (h, url) in urls.iter().enumerate() {
                let run = info(url);
                assert_eq!(run.round, round);
                for (k, c) in clients[h].iter().enumerate().take(2) {
                    c.submit(&run, round, &run.checkpoint, &deltas[k]).unwrap();
                }
                // The last submission closes the round, and its request waits for the workers.
                let last = std::thread::spawn({
                    let (c, run, d) =
                        (Client::with_key(url, clients[h][2].key.clone()), run.clone(), deltas[2].clone());
                    move || c.submit(&run, round, &run.checkpoint, &d).unwrap()
                });
                if h == 1 && round == 0 {
                    // A worker takes a job, stores a wrong part and dies (its connection goes).
                    let doomed = rt.block_on(async {
                        for _ in 0..600 {
                            if let Some(lease) = db.take_job().await.unwrap() {
                                return lease;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        panic!("no job appeared");
                    });
                    let plan = rt.block_on(db.job_plan(doomed.round)).unwrap().unwrap();
                    let id = tessera_hub::workers::plan_id(&plan);
                    let key = tessera_hub::workers::part_key(doomed.round, &id, doomed.shard);
                    rt.block_on(store.put(&key, vec![7u8; 100].into())).unwrap();
                    drop(doomed);
                }
                if h == 1 && workers.is_empty() {
                    for w in 0..2 {
                        let (db, store, mut stopped) = (db.clone(), store.clone(), stopped.clone());
                        workers.push(rt.spawn(async move {
                            let name = format!("worker-{w}");
                            tessera_hub::workers::work(&db, &store, &name, async move {
                                let _ = stopped.changed().await;
                            })
                            .await
                        }));
                    }
                }
                last.join().unwrap();
                let after = info(url);
                assert_eq!(after.round, round + 1, "{rule}: hub {h} published round {round}");
                // The update it publishes turns the round's weights into its checkpoint.
                let update = client(url).update(round + 1).unwrap();
                let view = MessageView::parse(&update).unwrap();
                let before = weights(url, &run.checkpoint, &run.spec.tensors);
                let rebuilt =
                    tessera_protocol::encode_weights(&run.spec.tensors, &view.apply_to(&before).unwrap()).unwrap();
                assert_eq!(hex::encode(weights_hash(&rebuilt)), after.checkpoint, "{rule}: hub {h}'s update");
                published.push(after.checkpoint);
            }
            assert_eq!(published[0], published[1], "{rule}, round {round}: workers = one hub, bit for bit");
        }
        let _ = stop.send(true);
        let (mut done, mut failed) = (0, 0);
        for w in workers {
            let (d, f) = rt.block_on(w).unwrap();
            (done, failed) = (done + d, failed + f);
        }
        // Every stage of both shards of both rounds, by the workers (the doomed job once).
        let stages = tessera_aggregate::shard::stages(&rule.parse().unwrap(), false);
        assert_eq!(tessera_aggregate::shard::plan(&[8, 32], 2).len(), 2);
        assert_eq!((done, failed), (u64::from(stages) * 2 * 2, 0), "{rule}: jobs the workers did");
        one.stop();
        sharded.stop();
    }
}

/// A Llama-shaped checkpoint written a tensor at a time into the S3-compatible server (in
/// parts, never whole in memory) reads back identical, streamed whole and one tensor by range.
/// By default 17M parameters; `TESSERA_TEST_CHECKPOINT=7b` makes it Llama-7B's 6.7 billion (a
/// 27 GB object: benchmarks/large_checkpoint.sh, not the suite).
#[test]
fn large_checkpoints_round_trip_in_parts() {
    let Some(b) = backend("s3") else { return };
    let (hidden, inter, layers, vocab) = match std::env::var("TESSERA_TEST_CHECKPOINT").as_deref() {
        Ok("7b") => (4096u64, 11008u64, 32, 32000u64),
        _ => (256, 688, 2, 32000),
    };
    let mut table = vec![TensorSpec { name: "model.embed_tokens.weight".into(), shape: vec![vocab, hidden] }];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![hidden, hidden]),
            ("self_attn.k_proj.weight", vec![hidden, hidden]),
            ("self_attn.v_proj.weight", vec![hidden, hidden]),
            ("self_attn.o_proj.weight", vec![hidden, hidden]),
            ("mlp.gate_proj.weight", vec![inter, hidden]),
            ("mlp.up_proj.weight", vec![inter, hidden]),
            ("mlp.down_proj.weight", vec![hidden, inter]),
            ("input_layernorm.weight", vec![hidden]),
            ("post_attention_layernorm.weight", vec![hidden]),
        ] {
            table.push(TensorSpec { name: format!("{p}.{name}"), shape });
        }
    }
    table.push(TensorSpec { name: "model.norm.weight".into(), shape: vec![hidden] });
    table.push(TensorSpec { name: "lm_head.weight".into(), shape: vec![vocab, hidden] });
    let params: u64 = table.iter().map(TensorSpec::numel).sum();
    let layout = tessera_protocol::WeightsLayout::of(&table).unwrap();
    // Tensor i's values, `count` of them from `from`: cheap, and different everywhere.
    let values = |i: usize, from: u64, count: u64| -> Vec<u8> {
        (from..from + count).flat_map(|j| (((i as u64 * 1_000_003 + j) % 65_521) as f32 * 1e-4).to_le_bytes()).collect()
    };
    const CHUNK: u64 = 8 << 20;
    let store = Store::open(&b.store).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let started = std::time::Instant::now();
    let written = rt.block_on(async {
        let mut w = store.writer("checkpoints/large.safetensors").await.unwrap();
        let mut hasher = blake3::Hasher::new();
        w.write(&layout.header).await.unwrap();
        hasher.update(&layout.header);
        for i in layout.file_order() {
            let n = table[i].numel();
            for from in (0..n).step_by(CHUNK as usize) {
                let bytes = values(i, from, CHUNK.min(n - from));
                hasher.update(&bytes);
                w.write(&bytes).await.unwrap();
            }
        }
        w.finish().await.unwrap();
        hasher.finalize()
    });
    let up = started.elapsed();
    let total = layout.header.len() as u64 + 4 * params;
    let read = rt.block_on(async {
        assert_eq!(store.size("checkpoints/large.safetensors").await.unwrap(), total);
        use futures::StreamExt as _;
        let mut stream = store.stream("checkpoints/large.safetensors", None).await.unwrap().into_stream();
        let (mut hasher, mut seen) = (blake3::Hasher::new(), 0u64);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            seen += chunk.len() as u64;
            hasher.update(&chunk);
        }
        assert_eq!(seen, total);
        hasher.finalize()
    });
    assert_eq!(read, written, "the object read back is the one written");
    // The last tensor in the file, by range.
    let last = *layout.file_order().last().unwrap();
    let n = table[last].numel();
    let tail = rt.block_on(store.get_range("checkpoints/large.safetensors", layout.file_range(last))).unwrap();
    assert!(tail.as_ref() == values(last, 0, n).as_slice(), "{} read by range", table[last].name);
    eprintln!(
        "{params} parameters, {total} bytes: written in {:.1} s, read back in {:.1} s",
        up.as_secs_f64(),
        (started.elapsed() - up).as_secs_f64()
    );
    rt.block_on(store.delete("checkpoints/large.safetensors")).unwrap();
}

/// A round's aggregation jobs are created once per plan: the same plan again (a replica taking
/// the round over) keeps what was done; a different plan (the round judged otherwise since)
/// replaces them, after a job of the old one still held commits.
#[test]
fn a_changed_plan_replaces_a_rounds_jobs() {
    let Some(b) = backend("postgres") else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let db = Db::connect(&b.db).await.unwrap();
        db.create_jobs(5, "plan a", 2, 3).await.unwrap();
        assert_eq!(db.pending_jobs(5).await.unwrap(), 6);
        let lease = db.take_job().await.unwrap().unwrap();
        assert_eq!((lease.round, lease.stage, lease.shard), (5, 0, 0));
        lease.done("\"Part\"", "w").await.unwrap();
        db.create_jobs(5, "plan a", 2, 3).await.unwrap();
        assert_eq!(db.pending_jobs(5).await.unwrap(), 5, "the same plan keeps what was done");
        // Stage 1 waits for all of stage 0.
        let held = db.take_job().await.unwrap().unwrap();
        assert_eq!((held.stage, held.shard), (0, 1));
        let replacing = {
            let url = b.db.clone();
            tokio::spawn(async move {
                let db = Db::connect(&url).await.unwrap();
                db.create_jobs(5, "plan b", 1, 2).await.unwrap();
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!replacing.is_finished(), "replacing waits for the held job");
        held.done("\"Part\"", "w").await.unwrap();
        replacing.await.unwrap();
        assert_eq!(db.job_plan(5).await.unwrap().as_deref(), Some("plan b"));
        assert_eq!(db.pending_jobs(5).await.unwrap(), 2, "the new plan's jobs, none done");
        assert_eq!(db.clear_jobs(6).await.unwrap(), vec![5]);
        assert!(db.take_job().await.unwrap().is_none());
    });
}
