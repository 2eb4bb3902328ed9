//! Tests of [`ScramServer`]: RFC 7677's exchange, gs2 flags, wrong proofs,
//! malformed messages, and arbitrary bytes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use proptest::prelude::*;

use super::*;
use crate::auth::messages::{SCRAM_SHA_256_PLUS, sasl_initial_response, split_message};
use crate::auth::secret::{Password, ScramKeys};
use crate::auth::test_vectors as rfc;

fn rfc_server() -> ScramServer {
    let secret = ScramSecret::parse(rfc::SECRET).expect("RFC secret parses");
    ScramServer::with_nonce(&secret, rfc::SERVER_NONCE.to_owned())
}

/// The body of a SASLInitialResponse carrying `client_first`.
fn initial_body(mechanism: &str, client_first: &str) -> Vec<u8> {
    let message = sasl_initial_response(mechanism, client_first.as_bytes());
    split_message(&message).expect("whole message").1.to_vec()
}

fn continue_data(step: ServerStep) -> String {
    let ServerStep::Continue(bytes) = step else {
        panic!("expected Continue, got {step:?}");
    };
    let (tag, body, rest) = split_message(&bytes).expect("whole message");
    assert_eq!((tag, rest.len()), (b'R', 0));
    assert_eq!(&body[..4], &11i32.to_be_bytes());
    String::from_utf8(body[4..].to_vec()).expect("server-first is UTF-8")
}

/// A client-final for `password` answering `server_first`, as a client would make it.
fn client_final(password: &str, gs2: &str, client_first_bare: &str, server_first: &str) -> String {
    let parsed = scram::parse_server_first(server_first).expect("server-first parses");
    let keys = ScramKeys::derive(&Password::new(password), &parsed.salt, parsed.iterations);
    let without_proof = format!("c={},r={}", BASE64.encode(gs2), parsed.nonce);
    let auth = scram::auth_message(client_first_bare, server_first, &without_proof);
    let signature = secret::hmac_sha256(&keys.client_key.stored_key(), &[auth.as_bytes()]);
    let proof = secret::xor(keys.client_key.as_bytes(), &signature);
    format!("{without_proof},p={}", BASE64.encode(proof))
}

#[test]
fn runs_the_rfc_7677_exchange() {
    let mut server = rfc_server();
    assert_eq!(
        server.auth_request(),
        messages::authentication_sasl(&["SCRAM-SHA-256"])
    );
    let step = server
        .receive(&initial_body(SCRAM_SHA_256, rfc::CLIENT_FIRST))
        .expect("client-first accepted");
    assert_eq!(continue_data(step), rfc::SERVER_FIRST);
    let step = server
        .receive(rfc::CLIENT_FINAL.as_bytes())
        .expect("proof accepted");
    let ServerStep::Authenticated {
        messages: out,
        client_key,
    } = step
    else {
        panic!("expected Authenticated, got {step:?}");
    };
    let mut want = messages::authentication_sasl_final(rfc::SERVER_FINAL.as_bytes());
    want.extend_from_slice(&messages::authentication_ok());
    assert_eq!(out, want);
    assert_eq!(BASE64.encode(client_key.as_bytes()), rfc::CLIENT_KEY_B64);
    assert_eq!(
        server.receive(b"again").unwrap_err(),
        ScramServerError::Ended
    );
}

#[test]
fn accepts_gs2_flag_y_since_no_plus_is_offered() {
    let mut server = rfc_server();
    let first = "y,,n=,r=clientnonce";
    let server_first = continue_data(
        server
            .receive(&initial_body(SCRAM_SHA_256, first))
            .expect("y accepted"),
    );
    let last = client_final(rfc::PASSWORD, "y,,", "n=,r=clientnonce", &server_first);
    assert!(matches!(
        server.receive(last.as_bytes()),
        Ok(ServerStep::Authenticated { .. })
    ));
}

#[test]
fn refuses_channel_binding_and_plus() {
    let cases: Vec<(Vec<u8>, ScramServerError)> = vec![
        (
            initial_body(SCRAM_SHA_256, "p=tls-server-end-point,,n=,r=abc"),
            ScramServerError::Syntax(SyntaxError::ChannelBindingRequired),
        ),
        (
            initial_body(SCRAM_SHA_256_PLUS, "p=tls-server-end-point,,n=,r=abc"),
            ScramServerError::Mechanism(SCRAM_SHA_256_PLUS.to_owned()),
        ),
    ];
    for (body, want) in cases {
        let err = rfc_server().receive(&body).unwrap_err();
        assert_eq!(err, want);
        assert_eq!(err.sqlstate(), "08P01");
    }
}

#[test]
fn wrong_password_fails_with_28p01() {
    let mut server = rfc_server();
    let server_first = continue_data(
        server
            .receive(&initial_body(SCRAM_SHA_256, "n,,n=,r=abc"))
            .expect("client-first accepted"),
    );
    let last = client_final("not pencil", "n,,", "n=,r=abc", &server_first);
    let err = server.receive(last.as_bytes()).unwrap_err();
    assert_eq!(err, ScramServerError::WrongPassword);
    assert_eq!(err.sqlstate(), "28P01");
    assert!(err.is_wrong_password());
    assert_eq!(
        err.client_message("app"),
        "sqlgate: password authentication failed for user \"app\""
    );
    assert_eq!(
        server.receive(last.as_bytes()).unwrap_err(),
        ScramServerError::Ended
    );
}

#[test]
fn malformed_initial_responses_are_typed_errors() {
    let cases: Vec<(Vec<u8>, ScramServerError)> = vec![
        (
            b"".to_vec(),
            ScramServerError::Message(messages::MessageError::String),
        ),
        (
            b"SCRAM-SHA-256\0\xff\xff\xff\xff".to_vec(),
            ScramServerError::NoInitialResponse,
        ),
        (
            initial_body("SCRAM-SHA-1", rfc::CLIENT_FIRST),
            ScramServerError::Mechanism("SCRAM-SHA-1".into()),
        ),
        (
            initial_body(SCRAM_SHA_256, "n,a=root,n=,r=abc"),
            ScramServerError::Syntax(SyntaxError::Authzid),
        ),
        (
            initial_body(SCRAM_SHA_256, "n,,n=,r=a b"),
            ScramServerError::Syntax(SyntaxError::Nonce),
        ),
        {
            let mut body = b"SCRAM-SHA-256\0\0\0\0\x02".to_vec();
            body.extend_from_slice(b"\xff\xfe");
            (body, ScramServerError::Syntax(SyntaxError::Utf8))
        },
    ];
    assert!(!cases.is_empty());
    for (body, want) in cases {
        let err = rfc_server().receive(&body).unwrap_err();
        assert_eq!(err, want, "{body:?}");
        assert_eq!(err.sqlstate(), "08P01");
    }
}

#[test]
fn malformed_final_responses_are_typed_errors() {
    let proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    let nonce = format!("{}{}", rfc::CLIENT_NONCE, rfc::SERVER_NONCE);
    let cases: Vec<(String, ScramServerError)> = vec![
        (
            format!("c=eSws,r={nonce},p={proof}"),
            ScramServerError::ChannelBinding,
        ),
        (
            format!("c=biws,r={}x,p={proof}", rfc::CLIENT_NONCE),
            ScramServerError::Nonce,
        ),
        (
            format!("c=biws,r={},p={proof}", rfc::CLIENT_NONCE),
            ScramServerError::Nonce,
        ),
        (
            format!("c=biws,r={nonce}"),
            ScramServerError::Syntax(SyntaxError::Expected("proof p=")),
        ),
        (
            format!("c=biws,r={nonce},p=AAAA"),
            ScramServerError::Syntax(SyntaxError::Length("proof")),
        ),
        (
            format!("c=biws,r={nonce},p={}", "A".repeat(43) + "="),
            ScramServerError::WrongPassword,
        ),
    ];
    assert!(!cases.is_empty());
    for (message, want) in cases {
        let mut server = rfc_server();
        server
            .receive(&initial_body(SCRAM_SHA_256, rfc::CLIENT_FIRST))
            .expect("client-first accepted");
        assert_eq!(
            server.receive(message.as_bytes()).unwrap_err(),
            want,
            "{message}"
        );
    }
}

#[test]
fn debug_output_hides_the_secret() {
    let shown = format!("{:?}", rfc_server());
    assert!(shown.contains("initial"), "{shown}");
    assert!(!shown.contains("WG5d8oPm"), "{shown}");
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_server(
        first in proptest::collection::vec(any::<u8>(), 0..200),
        second in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut server = rfc_server();
        let _ = server.receive(&first);
        let _ = server.receive(&second);
        // And after a valid client-first.
        let mut server = rfc_server();
        server.receive(&initial_body(SCRAM_SHA_256, rfc::CLIENT_FIRST)).expect("accepted");
        let _ = server.receive(&first);
    }

    #[test]
    fn arbitrary_scram_text_never_panics_the_server(first in "[nyp=a-z,]{0,12}[rnm]=[ -~]{0,40}", last in "[cpr]=[ -~,]{0,80}") {
        let mut server = rfc_server();
        if server.receive(&initial_body(SCRAM_SHA_256, &first)).is_ok() {
            let _ = server.receive(last.as_bytes());
        }
    }
}
