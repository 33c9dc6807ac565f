#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// A request to stop long work early (a progress callback returning false, Ctrl-C in Python).
///
/// The caller that starts the work creates it with a `poll` function; kernels ask `stopRequested` in
/// their block loops (every few milliseconds of work) and return early when it says so; the runner
/// then throws `.cancelled` (`throwIfCancelled`). `poll` runs only on the thread that created the
/// token (the caller's thread, which takes part in every parallel loop), at most every `interval`
/// seconds, so a Python poll can take the GIL without racing the worker threads.
public final class Cancellation: @unchecked Sendable {
    private let flag = Atomic<Bool>(false)
    private let poll: (() -> Bool)?
    private let owner: pthread_t
    private let interval: Double
    private var lastPoll: Double

    /// `poll` returns false to cancel. `interval` (seconds) bounds how often it is called.
    public init(interval: Double = 0.1, poll: (() -> Bool)?) {
        self.poll = poll
        self.interval = interval
        owner = pthread_self()
        lastPoll = Cancellation.now()
    }

    static func now() -> Double {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Double(t.tv_sec) + Double(t.tv_nsec) * 1e-9
    }

    /// Asks for the work to stop (from any thread).
    public func cancel() { flag.store(true, ordering: .relaxed) }

    public var isCancelled: Bool { flag.load(ordering: .relaxed) }

    /// Whether the work should stop; on the owner thread, polls when `interval` has passed. Cheap
    /// enough for every block of a kernel: the owner reads the clock on every call (a vDSO read, about
    /// 20 ns, where the shortest block, 16 voxels of a DDC, takes microseconds). Blocks also come in
    /// tens of milliseconds (a plane of a large convolution), so reading it only every 16th call let
    /// half a second pass between polls.
    public func stopRequested() -> Bool {
        if flag.load(ordering: .relaxed) { return true }
        guard let poll, pthread_equal(owner, pthread_self()) != 0 else { return false }
        let t = Cancellation.now()
        if t - lastPoll < interval { return false }
        lastPoll = t
        if !poll() { cancel(); return true }
        return false
    }

    /// Polls now (on the owner thread), then throws `.cancelled` if the work should stop.
    public func check(_ operation: String, _ what: @autoclosure () -> String) throws {
        if !flag.load(ordering: .relaxed), let poll, pthread_equal(owner, pthread_self()) != 0 {
            lastPoll = Cancellation.now()
            if !poll() { cancel() }
        }
        if flag.load(ordering: .relaxed) { throw DeformUXError.cancelled(operation, "cancelled \(what())") }
    }

    /// Throws `.cancelled` if the work was asked to stop (without polling).
    public func throwIfCancelled(_ operation: String, _ what: @autoclosure () -> String) throws {
        if flag.load(ordering: .relaxed) { throw DeformUXError.cancelled(operation, "cancelled \(what())") }
    }
}
