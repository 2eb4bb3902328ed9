//! Tests of [`ScramClient`]: RFC 7677's exchange with a password and with a
//! ClientKey, round trips against [`ScramServer`], secrets that differ,
//! malformed server messages, and arbitrary bytes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use proptest::prelude::*;

use super::*;
use crate::auth::messages::{
    AUTH_CLEARTEXT_PASSWORD, AUTH_MD5_PASSWORD, SCRAM_SHA_256_PLUS, authentication_ok,
    authentication_sasl, authentication_sasl_continue, authentication_sasl_final, split_message,
};
use crate::auth::scram_server::{ScramServer, ScramServerError, ServerStep};
use crate::auth::test_vectors as rfc;

/// The body of one whole message.
fn body(message: &[u8]) -> Vec<u8> {
    let (_, body, rest) = split_message(message).expect("one whole message");
    assert!(rest.is_empty(), "one message, not more");
    body.to_vec()
}

fn rfc_secret() -> ScramSecret {
    ScramSecret::parse(rfc::SECRET).expect("RFC secret parses")
}

fn rfc_client_key() -> ClientKey {
    let bytes = BASE64.decode(rfc::CLIENT_KEY_B64).expect("base64");
    ClientKey::from_bytes(bytes.try_into().expect("32 bytes"))
}

fn rfc_client(credential: Credential) -> ScramClient {
    ScramClient::with_nonce(credential, rfc::CLIENT_NONCE.to_owned(), "user")
}

fn sent(step: Result<ClientStep, ScramClientError>) -> Vec<u8> {
    match step {
        Ok(ClientStep::Send(bytes)) => bytes,
        other => panic!("expected Send, got {other:?}"),
    }
}

/// Runs the RFC 7677 exchange from the server's side and checks every
/// message the client sends.
fn assert_rfc_exchange(mut client: ScramClient) {
    let offer = authentication_sasl(&[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]);
    let first = sent(client.receive(&body(&offer)));
    assert_eq!(
        first,
        messages::sasl_initial_response(SCRAM_SHA_256, rfc::CLIENT_FIRST.as_bytes())
    );
    let challenge = authentication_sasl_continue(rfc::SERVER_FIRST.as_bytes());
    let last = sent(client.receive(&body(&challenge)));
    assert_eq!(last, messages::sasl_response(rfc::CLIENT_FINAL.as_bytes()));
    let verdict = authentication_sasl_final(rfc::SERVER_FINAL.as_bytes());
    assert_eq!(client.receive(&body(&verdict)), Ok(ClientStep::Verified));
    assert_eq!(
        client.receive(&body(&authentication_ok())),
        Ok(ClientStep::Authenticated)
    );
    assert_eq!(
        client.receive(&body(&authentication_ok())),
        Err(ScramClientError::Ended)
    );
}

#[test]
fn runs_the_rfc_7677_exchange_with_a_password() {
    assert_rfc_exchange(rfc_client(Credential::Password(Password::new(
        rfc::PASSWORD,
    ))));
}

#[test]
fn runs_the_rfc_7677_exchange_with_a_client_key() {
    assert_rfc_exchange(rfc_client(Credential::ClientKey {
        client_key: rfc_client_key(),
        secret: rfc_secret(),
    }));
}

/// How an in-memory exchange between sqlgate's two sides ended.
#[derive(Debug)]
enum Outcome {
    /// Both sides done; the ClientKey the server recovered.
    Authenticated(ClientKey),
    Server(ScramServerError),
    Client(ScramClientError),
}

/// Runs `client` against `server` in memory, message by message.
fn exchange(server: &mut ScramServer, client: &mut ScramClient) -> Outcome {
    let mut to_client = server.auth_request();
    let mut recovered = None;
    loop {
        while !to_client.is_empty() {
            let (tag, message, rest) = split_message(&to_client).expect("whole messages");
            assert_eq!(tag, b'R');
            let step = client.receive(message);
            to_client = rest.to_vec();
            match step {
                Err(e) => return Outcome::Client(e),
                Ok(ClientStep::Verified) => {}
                Ok(ClientStep::Authenticated) => {
                    return Outcome::Authenticated(recovered.expect("the server finished first"));
                }
                Ok(ClientStep::Send(bytes)) => match server.receive(&body(&bytes)) {
                    Err(e) => return Outcome::Server(e),
                    Ok(ServerStep::Continue(next)) => to_client = next,
                    Ok(ServerStep::Authenticated {
                        messages,
                        client_key,
                    }) => {
                        recovered = Some(client_key);
                        to_client = messages;
                    }
                },
            }
        }
    }
}

#[test]
fn client_key_recovered_from_a_password_client_opens_a_session() {
    let password = Password::new("correct horse");
    let secret = ScramSecret::generate(&password);
    // A client with the password authenticates to sqlgate…
    let mut client = ScramClient::new(Credential::Password(password.clone()));
    let Outcome::Authenticated(client_key) = exchange(&mut ScramServer::new(&secret), &mut client)
    else {
        panic!("password client was refused");
    };
    let want = ScramKeys::derive(&password, secret.salt(), secret.iterations());
    assert_eq!(client_key, want.client_key);
    // …and sqlgate authenticates with its ClientKey to a server holding the same secret.
    let mut pooled = ScramClient::new(Credential::ClientKey {
        client_key,
        secret: secret.clone(),
    });
    assert!(matches!(
        exchange(&mut ScramServer::new(&secret), &mut pooled),
        Outcome::Authenticated(_)
    ));
}

#[test]
fn wrong_password_is_refused_by_the_server() {
    let secret = ScramSecret::generate(&Password::new("right"));
    let mut client = ScramClient::new(Credential::Password(Password::new("wrong")));
    match exchange(&mut ScramServer::new(&secret), &mut client) {
        Outcome::Server(e) => assert_eq!(e, ScramServerError::WrongPassword),
        other => panic!("expected the server to refuse, got {other:?}"),
    }
}

#[test]
fn client_key_for_another_salt_reports_the_secret_differs() {
    let password = Password::new("pencil");
    let file_secret = ScramSecret::generate(&password);
    let cluster_secret = ScramSecret::generate(&password);
    let mut client = ScramClient::new(Credential::Password(password));
    let Outcome::Authenticated(client_key) =
        exchange(&mut ScramServer::new(&file_secret), &mut client)
    else {
        panic!("password client was refused");
    };
    let mut pooled = ScramClient::new(Credential::ClientKey {
        client_key,
        secret: file_secret,
    });
    match exchange(&mut ScramServer::new(&cluster_secret), &mut pooled) {
        Outcome::Client(e) => {
            assert_eq!(e, ScramClientError::SecretDiffers);
            assert!(e.to_string().contains("differs from the cluster's"), "{e}");
        }
        other => panic!("expected SecretDiffers, got {other:?}"),
    }
}

#[test]
fn server_refusal_maps_to_secret_differs_only_with_a_client_key() {
    let with_key = ScramClient::new(Credential::ClientKey {
        client_key: rfc_client_key(),
        secret: rfc_secret(),
    });
    assert_eq!(
        with_key.server_rejected("28P01"),
        ScramClientError::SecretDiffers
    );
    assert_eq!(
        with_key.server_rejected("53300"),
        ScramClientError::PasswordRejected("53300".into())
    );
    let with_password = ScramClient::new(Credential::Password(Password::new("x")));
    assert_eq!(
        with_password.server_rejected("28P01"),
        ScramClientError::PasswordRejected("28P01".into())
    );
}

#[test]
fn cleartext_password_requests_are_answered_only_with_a_password() {
    let request = body(&{
        let mut m = b"R\0\0\0\x08".to_vec();
        m.extend_from_slice(&AUTH_CLEARTEXT_PASSWORD.to_be_bytes());
        m
    });
    let mut client = ScramClient::new(Credential::Password(Password::new("pencil")));
    assert_eq!(
        client.receive(&request),
        Ok(ClientStep::Send(messages::password_message(b"pencil")))
    );
    assert_eq!(
        client.receive(&body(&authentication_ok())),
        Ok(ClientStep::Authenticated)
    );
    let mut keyed = rfc_client(Credential::ClientKey {
        client_key: rfc_client_key(),
        secret: rfc_secret(),
    });
    assert!(matches!(
        keyed.receive(&request),
        Err(ScramClientError::Unsupported(_))
    ));
}

#[test]
fn trust_needs_no_credential() {
    let mut client = rfc_client(Credential::Password(Password::new("unused")));
    assert_eq!(
        client.receive(&body(&authentication_ok())),
        Ok(ClientStep::Authenticated)
    );
}

#[test]
fn a_certificate_is_enough_only_when_the_node_asks_for_nothing() {
    let mut client = rfc_client(Credential::Certificate);
    assert_eq!(
        client.receive(&body(&authentication_ok())),
        Ok(ClientStep::Authenticated)
    );
    let asks = [
        body(&authentication_sasl(&[SCRAM_SHA_256])),
        AUTH_CLEARTEXT_PASSWORD.to_be_bytes().to_vec(),
        [AUTH_MD5_PASSWORD.to_be_bytes().as_slice(), b"salt"].concat(),
    ];
    assert!(!asks.is_empty());
    for ask in asks {
        assert_eq!(
            rfc_client(Credential::Certificate).receive(&ask),
            Err(ScramClientError::CertificateNotEnough),
            "{ask:?}"
        );
    }
}

/// A client in the state after it sent its client-first.
fn after_first(credential: Credential) -> ScramClient {
    let mut client = rfc_client(credential);
    let offer = authentication_sasl(&[SCRAM_SHA_256]);
    sent(client.receive(&body(&offer)));
    client
}

fn password() -> Credential {
    Credential::Password(Password::new(rfc::PASSWORD))
}

fn keyed() -> Credential {
    Credential::ClientKey {
        client_key: rfc_client_key(),
        secret: rfc_secret(),
    }
}

#[test]
fn bad_server_messages_are_typed_errors() {
    let nonce = format!("{}{}", rfc::CLIENT_NONCE, rfc::SERVER_NONCE);
    let auth = |code: i32, data: &[u8]| {
        let mut b = code.to_be_bytes().to_vec();
        b.extend_from_slice(data);
        b
    };
    // (credential, body after client-first, expected error)
    let cases: Vec<(Credential, Vec<u8>, ScramClientError)> = vec![
        (
            password(),
            auth(11, b"r=someone-else,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"),
            ScramClientError::Nonce,
        ),
        (
            password(),
            auth(
                11,
                format!("r={},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", rfc::CLIENT_NONCE).as_bytes(),
            ),
            ScramClientError::Nonce,
        ),
        (
            password(),
            auth(
                11,
                format!("r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4000000").as_bytes(),
            ),
            ScramClientError::TooManyIterations(4_000_000),
        ),
        (
            keyed(),
            auth(
                11,
                format!("r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4097").as_bytes(),
            ),
            ScramClientError::SecretDiffers,
        ),
        (
            keyed(),
            auth(11, format!("r={nonce},s=c2FsdA==,i=4096").as_bytes()),
            ScramClientError::SecretDiffers,
        ),
        (
            password(),
            auth(11, b"r=x,s=***,i=1"),
            ScramClientError::Syntax(SyntaxError::Base64("salt")),
        ),
        (
            password(),
            auth(11, b"\xff"),
            ScramClientError::Syntax(SyntaxError::Utf8),
        ),
        (
            password(),
            auth(12, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            ScramClientError::Unexpected {
                got: "AuthenticationSASLFinal",
                expected: "AuthenticationSASLContinue",
            },
        ),
        (
            password(),
            auth(0, b""),
            ScramClientError::Unexpected {
                got: "AuthenticationOk",
                expected: "AuthenticationSASLContinue",
            },
        ),
        (
            password(),
            b"\0\0".to_vec(),
            ScramClientError::Message(messages::MessageError::Truncated),
        ),
    ];
    assert!(!cases.is_empty());
    for (credential, message, want) in cases {
        let mut client = after_first(credential);
        assert_eq!(client.receive(&message), Err(want.clone()), "{want}");
        assert_eq!(
            client.receive(&body(&authentication_ok())),
            Err(ScramClientError::Ended)
        );
    }
}

#[test]
fn bad_server_final_messages_are_typed_errors() {
    let cases: Vec<(&str, ScramClientError)> = vec![
        (
            "e=invalid-proof",
            ScramClientError::ServerError("invalid-proof".into()),
        ),
        (
            "v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ScramClientError::ServerSignature,
        ),
        (
            "x=1",
            ScramClientError::Syntax(SyntaxError::Expected("verifier v= or error e=")),
        ),
    ];
    assert!(!cases.is_empty());
    for (credential, (message, want)) in [password(), keyed()]
        .into_iter()
        .flat_map(|c| cases.iter().map(move |case| (c.clone(), case)))
    {
        let mut client = after_first(credential);
        let challenge = authentication_sasl_continue(rfc::SERVER_FIRST.as_bytes());
        sent(client.receive(&body(&challenge)));
        let verdict = authentication_sasl_final(message.as_bytes());
        assert_eq!(
            client.receive(&body(&verdict)),
            Err(want.clone()),
            "{message}"
        );
    }
}

#[test]
fn first_requests_it_cannot_answer_are_typed_errors() {
    let md5 = {
        let mut b = AUTH_MD5_PASSWORD.to_be_bytes().to_vec();
        b.extend_from_slice(b"salt");
        b
    };
    let cases: Vec<(Vec<u8>, ScramClientError)> = vec![
        (
            body(&authentication_sasl(&[SCRAM_SHA_256_PLUS])),
            ScramClientError::NoScram(vec![SCRAM_SHA_256_PLUS.into()]),
        ),
        (md5, ScramClientError::Unsupported("md5 authentication")),
        (
            7i32.to_be_bytes().to_vec(),
            ScramClientError::Unsupported(
                "an authentication method other than SCRAM-SHA-256 or password",
            ),
        ),
        (
            body(&authentication_sasl_continue(rfc::SERVER_FIRST.as_bytes())),
            ScramClientError::Unexpected {
                got: "AuthenticationSASLContinue",
                expected: "an authentication request",
            },
        ),
    ];
    assert!(!cases.is_empty());
    for (message, want) in cases {
        assert_eq!(rfc_client(password()).receive(&message), Err(want));
    }
}

#[test]
fn debug_output_hides_the_credential() {
    let shown = format!("{:?}", rfc_client(keyed()));
    assert!(!shown.contains("pg/JI9Z"), "{shown}");
    assert!(!shown.contains("WG5d8oPm"), "{shown}");
    let shown = format!("{:?}", rfc_client(password()));
    assert!(!shown.contains("pencil"), "{shown}");
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_client(
        messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..4),
    ) {
        for credential in [password(), keyed()] {
            let mut fresh = rfc_client(credential.clone());
            let mut started = after_first(credential);
            for message in &messages {
                let _ = fresh.receive(message);
                let _ = started.receive(message);
            }
        }
    }
}
