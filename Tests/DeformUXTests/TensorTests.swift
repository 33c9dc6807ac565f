import XCTest
@testable import DeformUX

/// Tensor memory: the storage pool's reuse and its bound, big (mmap'd) and small allocations, the
/// thread pool's static partition.
final class TensorTests: XCTestCase {
    func testPoolReusesMemoryOfTheSameSize() throws {
        let pool = StoragePool()
        var first: UnsafeMutablePointer<Float>?
        do {
            let t = try Tensor(uninitialized: [4, 1 << 20], pool: pool)  // 16 MB: mmap'd
            first = t.pointer
            t.pointer[0] = 7
        }
        XCTAssertEqual(pool.retainedBytes, 16 << 20)
        let again = try Tensor(uninitialized: [1 << 22], pool: pool)
        XCTAssertEqual(again.pointer, first, "same size: the released memory is reused")
        XCTAssertEqual(pool.retainedBytes, 0)
        let zeroed = try TensorStorage(count: 1 << 22, zeroed: true, pool: pool)
        XCTAssertTrue((0..<16).allSatisfy { zeroed.pointer[$0] == 0 })
    }

    func testPoolNeverHoldsMoreThanTheLargestLiveSet() throws {
        let pool = StoragePool()
        // Live high water: 3 x 8 MB.
        do {
            let a = try Tensor(uninitialized: [1 << 21], pool: pool)
            let b = try Tensor(uninitialized: [1 << 21], pool: pool)
            let c = try Tensor(uninitialized: [1 << 21], pool: pool)
            _ = (a, b, c)
        }
        XCTAssertEqual(pool.retainedBytes, 24 << 20)
        // A new size with nothing live: 16 MB + 24 MB retained would exceed 24 MB, so retained memory goes.
        let big = try Tensor(uninitialized: [1 << 22], pool: pool)
        XCTAssertLessThanOrEqual(pool.retainedBytes + big.count * 4, 24 << 20)
        pool.endPass()
        pool.trim()
        XCTAssertEqual(pool.retainedBytes, 0)
    }

    func testEndPassFreesSizesThePassDidNotUse() throws {
        let pool = StoragePool()
        do {
            let a = try Tensor(uninitialized: [100], pool: pool), b = try Tensor(uninitialized: [200], pool: pool)
            _ = (a, b)
        }
        pool.endPass()
        XCTAssertEqual(pool.retainedBytes, 1200, "both sizes were used in this pass")
        do { _ = try Tensor(uninitialized: [100], pool: pool) }
        pool.endPass()
        XCTAssertEqual(pool.retainedBytes, 400, "the 200-float buffer was not used in the last pass")
    }

    func testStaticPartitionCoversTheRangeInOrder() {
        for total in [0, 1, 5, 16, 97] {
            for parts in 1...5 {
                let ranges = (0..<parts).map { Threads.range($0, of: parts, total: total) }
                XCTAssertEqual(ranges.first?.lowerBound, 0)
                XCTAssertEqual(ranges.last?.upperBound, total)
                for i in 1..<parts { XCTAssertEqual(ranges[i - 1].upperBound, ranges[i].lowerBound) }
                XCTAssertLessThanOrEqual((ranges.map(\.count).max() ?? 0) - (ranges.map(\.count).min() ?? 0), 1)
            }
        }
    }

    func testParallelForRunsEveryPartOnceAndNests() {
        let guardCount = ThreadCountGuard()
        defer { guardCount.restore() }
        try? Threads.setCount(2)
        var hits = [Int](repeating: 0, count: 37)
        hits.withUnsafeMutableBufferPointer { h in
            parallelFor(37) { part in
                h[part] += 1
                parallelFor(3) { _ in }  // nested: runs serially, no deadlock
            }
        }
        XCTAssertEqual(hits, [Int](repeating: 1, count: 37))
        // Raising and lowering the count: every part still runs exactly once.
        for n in [4, 1, 3, 2] {
            try? Threads.setCount(n)
            var counts = [Int](repeating: 0, count: 23)
            counts.withUnsafeMutableBufferPointer { h in parallelFor(23) { h[$0] += 1 } }
            XCTAssertEqual(counts, [Int](repeating: 1, count: 23), "\(n) threads")
        }
        XCTAssertThrowsError(try Threads.setCount(0))
    }
}
