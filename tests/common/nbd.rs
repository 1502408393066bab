//! A small blocking NBD client for system tests that need to send exactly
//! the bytes they choose (malformed requests, byte-granular I/O), built on
//! the client half of `tandem_proto`'s codec.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use tandem_proto::nbd::ErrorCode;
use tandem_proto::nbd::consts::*;
use tandem_proto::nbd::handshake::client::{self, Info};
use tandem_proto::nbd::transmission::{RequestHeader, SimpleReply};

pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub fn connect_unix(path: &Path) -> Box<dyn Stream> {
    let s = UnixStream::connect(path).expect("connect unix");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    Box::new(s)
}

pub fn connect_tcp(port: u16) -> Box<dyn Stream> {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect tcp");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_nodelay(true).unwrap();
    Box::new(s)
}

pub struct RawClient {
    pub stream: Box<dyn Stream>,
    pub size: u64,
    pub flags: u16,
    next_cookie: u64,
}

/// Read option replies until the final one; returns (replies, buffer rest).
fn read_option_replies(stream: &mut dyn Stream) -> Result<Vec<client::OptionReply>, String> {
    let mut buf = BytesMut::new();
    let mut replies = Vec::new();
    loop {
        while let Some(r) =
            client::take_option_reply(&mut buf).map_err(|m| format!("bad reply magic {m:#x}"))?
        {
            let last = r.reply_type == REP_ACK || r.reply_type & (1 << 31) != 0;
            replies.push(r);
            if last {
                return Ok(replies);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("server closed the connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Read the greeting and send client flags.
pub fn greet(stream: &mut dyn Stream) {
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).expect("greeting");
    client::decode_greeting(&greeting).expect("valid greeting");
    stream
        .write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
}

/// Send one option and read its replies.
pub fn option(
    stream: &mut dyn Stream,
    opt: u32,
    data: &[u8],
) -> Result<Vec<client::OptionReply>, String> {
    stream
        .write_all(&client::encode_option(opt, data))
        .map_err(|e| e.to_string())?;
    read_option_replies(stream)
}

impl RawClient {
    /// Negotiate with NBD_OPT_GO; `Err` carries the server's message.
    pub fn go(mut stream: Box<dyn Stream>, name: &str) -> Result<RawClient, String> {
        greet(&mut *stream);
        RawClient::go_greeted(stream, name)
    }

    /// NBD_OPT_GO on a stream that has already been greeted (and may have
    /// negotiated other options).
    pub fn go_greeted(mut stream: Box<dyn Stream>, name: &str) -> Result<RawClient, String> {
        let replies = option(
            &mut *stream,
            OPT_GO,
            &client::encode_info_request(name, &[INFO_BLOCK_SIZE]),
        )?;
        let mut size = None;
        let mut flags = 0;
        for r in &replies {
            if r.reply_type & (1 << 31) != 0 {
                return Err(String::from_utf8_lossy(&r.body).into_owned());
            }
            if r.reply_type == REP_INFO
                && let Ok(Info::Export { size: s, flags: f }) = client::decode_info(&r.body)
            {
                size = Some(s);
                flags = f;
            }
        }
        Ok(RawClient {
            stream,
            size: size.ok_or("no export info")?,
            flags,
            next_cookie: 1,
        })
    }

    pub fn send(
        &mut self,
        command: u16,
        cmd_flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let h = RequestHeader {
            flags: cmd_flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut msg = h.encode().to_vec();
        msg.extend_from_slice(payload);
        self.stream.write_all(&msg).expect("send request");
        cookie
    }

    pub fn reply(&mut self) -> SimpleReply {
        self.try_reply().expect("reply header")
    }

    /// The next reply header, or the error that ended the stream.
    pub fn try_reply(&mut self) -> std::io::Result<SimpleReply> {
        let mut raw = [0u8; 16];
        self.stream.read_exact(&mut raw)?;
        Ok(SimpleReply::decode(&raw).expect("reply magic"))
    }

    /// Send `command` and wait for its (data-less) reply.
    fn simple(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> Result<(), ErrorCode> {
        let cookie = self.send(command, flags, offset, length, &[]);
        let r = self.reply();
        assert_eq!(r.cookie, cookie);
        r.error.map_or(Ok(()), Err)
    }

    pub fn trim(&mut self, offset: u64, len: u32, fua: bool) -> Result<(), ErrorCode> {
        self.simple(CMD_TRIM, if fua { CMD_FLAG_FUA } else { 0 }, offset, len)
    }

    /// NBD_CMD_WRITE_ZEROES with the given command flags (FUA, NO_HOLE, FAST_ZERO).
    pub fn write_zeroes(&mut self, offset: u64, len: u32, flags: u16) -> Result<(), ErrorCode> {
        self.simple(CMD_WRITE_ZEROES, flags, offset, len)
    }

    /// Read the data of a successful read reply.
    pub fn read_data(&mut self, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.stream.read_exact(&mut data).expect("read data");
        data
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ErrorCode> {
        let cookie = self.send(CMD_READ, 0, offset, len, &[]);
        let r = self.reply();
        assert_eq!(r.cookie, cookie);
        if let Some(e) = r.error {
            return Err(e);
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).expect("read data");
        Ok(data)
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ErrorCode> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let cookie = self.send(CMD_WRITE, flags, offset, data.len() as u32, data);
        let r = self.reply();
        assert_eq!(r.cookie, cookie);
        r.error.map_or(Ok(()), Err)
    }

    pub fn flush(&mut self) -> Result<(), ErrorCode> {
        let cookie = self.send(CMD_FLUSH, 0, 0, 0, &[]);
        let r = self.reply();
        assert_eq!(r.cookie, cookie);
        r.error.map_or(Ok(()), Err)
    }

    /// Assert that the server closes the connection (after any replies
    /// still on their way), within the stream's read timeout.
    pub fn expect_closed(self) {
        expect_closed(self.stream)
    }

    /// Send NBD_CMD_DISC and wait for the server to close.
    pub fn disconnect(mut self) {
        self.send(CMD_DISC, 0, 0, 0, &[]);
        let mut rest = Vec::new();
        let _ = self.stream.read_to_end(&mut rest);
    }
}

/// Read and drop whatever arrives until the server closes the connection
/// (EOF or reset); panics if it stays open for the read timeout.
pub fn expect_closed(mut stream: Box<dyn Stream>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("expected the server to close the connection, but: {e}"),
        }
    }
}
