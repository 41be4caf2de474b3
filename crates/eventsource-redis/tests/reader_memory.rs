//! The consumer's own RESP reader never sizes an allocation from a header: a bulk string
//! announced as 400 MB followed by three bytes, and an entry id or stream name announced
//! huge, cost no large allocation (measured by a counting allocator) and are refused.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Records the largest single allocation asked for.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// The counter is the process's: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `read_reply` on `data`: its result and the largest allocation made meanwhile.
fn read(data: &[u8]) -> (Result<usize, String>, usize) {
    LARGEST.store(0, Ordering::SeqCst);
    let result = eventsource_redis::fuzzing::read_reply(data, &[], usize::MAX);
    (result, LARGEST.load(Ordering::SeqCst))
}

const MIB: usize = 1024 * 1024;

#[test]
fn a_huge_bulk_header_with_a_few_bytes_behind_it_allocates_little() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let data = b"*1\r\n*2\r\n$6\r\norders\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$5\r\nfield\r\n$400000000\r\nabc";
    let (result, largest) = read(data);
    assert!(result.is_err(), "{result:?}");
    assert!(largest < MIB, "largest allocation {largest} bytes");
}

#[test]
fn an_entry_id_or_a_stream_name_announced_huge_is_refused_unread() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let id = b"*1\r\n*2\r\n$6\r\norders\r\n*1\r\n*2\r\n$300000000\r\n1-1";
    let (result, largest) = read(id);
    assert!(
        result.as_ref().is_err_and(|e| e.contains("entry id")),
        "{result:?}"
    );
    assert!(largest < MIB, "largest allocation {largest} bytes");
    let name = b"*1\r\n*2\r\n$300000000\r\norders";
    let (result, largest) = read(name);
    assert!(
        result.as_ref().is_err_and(|e| e.contains("stream name")),
        "{result:?}"
    );
    assert!(largest < MIB, "largest allocation {largest} bytes");
}

#[test]
fn a_large_value_that_does_arrive_is_read_whole() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let value = vec![b'x'; 3 * MIB];
    let mut data =
        b"*1\r\n*2\r\n$6\r\norders\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$5\r\nfield\r\n".to_vec();
    data.extend_from_slice(format!("${}\r\n", value.len()).as_bytes());
    data.extend_from_slice(&value);
    data.extend_from_slice(b"\r\n");
    let (result, _) = read(&data);
    assert_eq!(result, Ok(1));
}
