use super::*;

fn routing() -> Routing {
    Routing {
        from: "clinic-001".into(),
        to: "core-01".into(),
        kind: "booking-request".into(),
        id: "req-7f3a".into(),
    }
}

const BODY: &[u8] = "{\"patient\":{\"name\":\"ZZTEST^TARO=山田^太郎\",\"id\":\"ZZPID0001\",\"birth_date\":\"19700101\"}}".as_bytes();

#[test]
fn sealed_to_the_core_opens_there_and_hides_the_patient() {
    let clinic = ExchangeKey::generate().unwrap();
    let core = ExchangeKey::generate().unwrap();
    let env = seal(&clinic, &core.public(), routing(), BODY).unwrap();
    let wire = env.to_bytes();
    let text = String::from_utf8_lossy(&wire);
    for needle in ["ZZTEST", "ZZPID", "19700101", "山田"] {
        assert!(!text.contains(needle), "{needle} in {text}");
    }
    assert!(
        text.contains("\"from\":\"clinic-001\"") && text.contains("\"kind\":\"booking-request\"")
    );
    let parsed = Envelope::parse(&wire).unwrap();
    assert_eq!(parsed, env);
    assert_eq!(
        open(&core, "core-01", &clinic.public(), &parsed).unwrap(),
        BODY
    );
    // The same body sealed twice gives different ciphertexts (fresh ephemeral keys).
    assert_ne!(
        seal(&clinic, &core.public(), routing(), BODY).unwrap().ct,
        env.ct
    );
}

#[test]
fn altered_readdressed_or_foreign_envelopes_do_not_open() {
    let clinic = ExchangeKey::generate().unwrap();
    let other_clinic = ExchangeKey::generate().unwrap();
    let core = ExchangeKey::generate().unwrap();
    let env = seal(&clinic, &core.public(), routing(), BODY).unwrap();
    // Any routing field changed: the AAD no longer matches.
    for change in [
        |e: &mut Envelope| e.from = "clinic-002".into(),
        |e: &mut Envelope| e.kind = "booking-decision".into(),
        |e: &mut Envelope| e.id = "req-0000".into(),
    ] {
        let mut e = env.clone();
        change(&mut e);
        assert_eq!(
            open(&core, "core-01", &clinic.public(), &e),
            Err(ExchangeError::Open)
        );
    }
    let mut e = env.clone();
    e.to = "core-02".into();
    assert!(matches!(
        open(&core, "core-01", &clinic.public(), &e),
        Err(ExchangeError::NotForUs { .. })
    ));
    // A flipped ciphertext byte.
    let mut ct = B64.decode(&env.ct).unwrap();
    ct[3] ^= 1;
    let e = Envelope {
        ct: B64.encode(ct),
        ..env.clone()
    };
    assert_eq!(
        open(&core, "core-01", &clinic.public(), &e),
        Err(ExchangeError::Open)
    );
    // Auth mode: claiming another clinic as sender fails; a third party cannot open it.
    assert_eq!(
        open(&core, "core-01", &other_clinic.public(), &env),
        Err(ExchangeError::Open)
    );
    let eavesdropper = ExchangeKey::generate().unwrap();
    assert_eq!(
        open(&eavesdropper, "core-01", &clinic.public(), &env),
        Err(ExchangeError::Open)
    );
}

#[test]
fn keys_round_trip_through_seed_and_base64() {
    let k = ExchangeKey::generate().unwrap();
    let again = ExchangeKey::from_seed(*k.seed());
    assert_eq!(again.public(), k.public());
    let text = k.public().to_base64();
    assert_eq!(PeerKey::from_base64(&text).unwrap(), k.public());
    assert!(PeerKey::from_base64("not base64!").is_err());
    assert!(PeerKey::from_base64("AAAA").is_err());
    assert!(
        !format!("{k:?}").contains(&B64.encode(k.seed())),
        "no secret in Debug"
    );
}

#[test]
fn malformed_envelopes_are_errors_never_panics() {
    let clinic = ExchangeKey::generate().unwrap();
    let core = ExchangeKey::generate().unwrap();
    let good = seal(&clinic, &core.public(), routing(), b"x")
        .unwrap()
        .to_bytes();
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    for round in 0..3000 {
        let mut bytes = good.clone();
        for _ in 0..(round % 5 + 1) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let i = (seed as usize) % bytes.len();
            bytes[i] = (seed >> 40) as u8;
        }
        if let Ok(env) = Envelope::parse(&bytes) {
            let _ = open(&core, "core-01", &clinic.public(), &env);
        }
    }
    for bad in [
        &b""[..],
        b"{}",
        b"[]",
        b"null",
        b"{\"v\":2}",
        &vec![b' '; MAX_ENVELOPE_BYTES + 1],
    ] {
        assert!(Envelope::parse(bad).is_err());
    }
    let mut v2: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v2["v"] = 2.into();
    assert!(Envelope::parse(&serde_json::to_vec(&v2).unwrap()).is_err());
    v2["v"] = 1.into();
    v2["extra"] = 1.into();
    assert!(Envelope::parse(&serde_json::to_vec(&v2).unwrap()).is_err());
    v2.as_object_mut().unwrap().remove("extra");
    v2["to"] = "core 01/#".into();
    assert!(
        Envelope::parse(&serde_json::to_vec(&v2).unwrap()).is_err(),
        "ids that could not be topic parts"
    );
    assert!(
        seal(
            &clinic,
            &core.public(),
            Routing {
                id: String::new(),
                ..routing()
            },
            b"x"
        )
        .is_err()
    );
}

#[test]
fn derived_keys_are_stable_per_master_and_distinct_across_masters() {
    let a = ExchangeKey::derive(&MasterKey::from_bytes([7u8; 32]));
    let again = ExchangeKey::derive(&MasterKey::from_bytes([7u8; 32]));
    let b = ExchangeKey::derive(&MasterKey::from_bytes([8u8; 32]));
    assert_eq!(a.public(), again.public());
    assert_ne!(a.public(), b.public());
    assert_ne!(a.seed(), &[7u8; 32]);
}

#[test]
fn the_derived_seed_is_the_one_existing_gateways_published_their_public_key_from() {
    // HMAC-SHA-256([0x11; 32], "gatewayd exchange x25519 key v1"), the construction before
    // MasterKey::derive existed: peers configured with the old public key still match.
    let key = ExchangeKey::derive(&MasterKey::from_bytes([0x11; 32]));
    let hex: String = key.seed().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "e57544caf96acfa91325c1aa8cb07d928a7a47d580087fb5e65dc38ace34d3db"
    );
}
