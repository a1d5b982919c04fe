//! The examples' handlers, served in-process: what a user who copies them relies on.
#![allow(dead_code)] // each example's `main` is not used here

mod common;

#[path = "../examples/chat.rs"]
mod chat;
#[path = "../examples/custom_handler.rs"]
mod custom_handler;

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use common::{connect, eventually};
use taskserve::Server;

#[test]
fn custom_handler_keeps_a_character_cut_by_the_line_limit_whole() {
    let server = Server::builder()
        .threads(1)
        .listen_tcp("127.0.0.1:0")
        .start(custom_handler::shout)
        .unwrap();
    let mut client = connect(server.local_addr().unwrap());
    // 'é' is two bytes, and the 64 KiB limit falls between them.
    let mut line = vec![b'a'; 64 * 1024 - 1];
    line.extend_from_slice("é and more\n".as_bytes());
    client.write_all(&line).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    client.read_to_string(&mut reply).unwrap();
    assert!(!reply.contains('\u{FFFD}'), "a character was split in two");
    assert_eq!(reply, format!("{}É AND MORE\n", "A".repeat(64 * 1024 - 1)));
    server.stop();
}

#[test]
fn chat_relays_lines_and_says_goodbye_to_everyone_when_the_server_stops() {
    let room = Arc::new(chat::Room::default());
    let server = Server::builder()
        .threads(2)
        .shutdown_timeout(Duration::from_secs(60))
        .listen_tcp("127.0.0.1:0")
        .start({
            let room = Arc::clone(&room);
            move |conn| chat::chat(Arc::clone(&room), conn)
        })
        .unwrap();
    // One at a time: each client's task joins the room on whichever worker runs it first.
    let mut alice = connect(server.local_addr().unwrap());
    assert!(eventually(|| room.headcount() == 1), "alice did not join");
    let mut bob = BufReader::new(connect(server.local_addr().unwrap()));
    let bob_addr = bob.get_ref().local_addr().unwrap();
    let alice_addr = alice.local_addr().unwrap();
    // Alice hears Bob join; then her line reaches Bob.
    let mut alice_lines = BufReader::new(alice.try_clone().unwrap());
    let mut heard = String::new();
    alice_lines.read_line(&mut heard).unwrap();
    assert_eq!(heard, format!("{bob_addr} joined\n"));
    alice.write_all(b"hi bob\n").unwrap();
    let mut line = String::new();
    bob.read_line(&mut line).unwrap();
    assert_eq!(line, format!("{alice_addr}: hi bob\n"));

    // Both still connected: the stop returns once each has been told and closed.
    server.stop();
    for (who, reader) in [("alice", &mut alice_lines), ("bob", &mut bob)] {
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert!(
            rest.ends_with("server shutting down\n"),
            "{who} got {rest:?}"
        );
    }
}
