import Foundation
import XCTest
@testable import DeformUX

/// Sessions, locks and cancellation at the engine's own level (issue 6: item 2 and the Ctrl-C
/// should-fix). The Python side of the same promises is python/tests/test_concurrency.py.
final class ConcurrencyTests: XCTestCase {
    func input(_ seed: UInt64, _ shape: [Int]) throws -> Tensor {
        var rng = SplitMix64(seed: seed)
        return try Tensor(shape: shape, values: rng.floats(shape.reduce(1, *)))
    }

    // MARK: Cancellation inside kernels

    func testCancellationPollsPromptlyWhenBlocksAreSlow() {
        // Blocks of 20 ms (a plane of a large convolution): the poll must come after about `interval`
        // (0.1 s), not after 16 blocks (0.32 s), as when the clock was read only every 16th call.
        var polls = 0
        let c = Cancellation(poll: { polls += 1; return false })
        var calls = 0
        while !c.stopRequested() && calls < 100 {
            usleep(20_000)
            calls += 1
        }
        XCTAssertTrue(c.isCancelled)
        XCTAssertEqual(polls, 1)
        XCTAssertLessThan(calls, 12, "the poll came after \(calls) blocks of 20 ms")
        // Fast blocks still reach the poll, after about the interval.
        let start = Cancellation.now()
        let fast = Cancellation(poll: { false })
        var n = 0
        while !fast.stopRequested() { n += 1 }
        XCTAssertLessThan(Cancellation.now() - start, 1.0, "\(n) fast calls")
    }

    func testACancelledKernelStopsEarlyAndSaysSo() throws {
        let shape = try DDCShape(n: 1, c: 8, d: 16, h: 16, w: 16)
        let x = try input(1, [1, 8, 16, 16, 16])
        let offsets = try Tensor(zeros: [1, 81, 16, 16, 16])
        let weight = try input(2, [8, 1, 3, 3, 3])
        let y = try Tensor(uninitialized: [1, 8, 16, 16, 16])
        y.pointer.initialize(repeating: .nan, count: y.count)
        let ws = Workspace()
        // Cancels at the first poll (interval 0): the kernel returns after at most a block per part.
        ws.cancellation = Cancellation(interval: 0, poll: { false })
        do {
            try DeformConv3d.forward(x: x.pointer, offsets: offsets.pointer, weight: weight.pointer, bias: nil, y: y.pointer,
                                     shape: shape, workspace: ws)
            XCTFail("a cancelled forward returned normally")
        } catch let e as DeformUXError {
            XCTAssertEqual(e.kind, .cancelled)
        }
        let untouched = try y.toArray().filter(\.isNaN).count
        XCTAssertGreaterThan(untouched, y.count / 2, "the cancelled kernel computed most of its output anyway")
        // The same workspace, not cancelled, computes the whole output.
        ws.cancellation = nil
        try DeformConv3d.forward(x: x.pointer, offsets: offsets.pointer, weight: weight.pointer, bias: nil, y: y.pointer,
                                 shape: shape, workspace: ws)
        XCTAssertFalse(try y.toArray().contains(where: \.isNaN))
    }
}
