// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

/// A callback consumer for the tests (EIP-1154, PoCo's IOracleConsumer): PoCo calls
/// receiveResult(taskId, callback-data) when it finalizes a task whose request order named
/// this contract as its callback. Its mode says what it does with the call:
/// 0 stores the data, 1 reverts, 2 burns all the gas it is given.
contract Consumer {
    uint8 public immutable mode;
    mapping(bytes32 => bytes) public results;
    mapping(bytes32 => address) public callers;
    uint256 public burnt;

    event ResultReceived(bytes32 indexed taskId, bytes data);

    constructor(uint8 mode_) {
        mode = mode_;
    }

    function receiveResult(bytes32 taskId, bytes calldata data) external {
        require(mode != 1, "consumer refuses the result");
        if (mode == 2) {
            while (true) {
                burnt += 1;
            }
        }
        results[taskId] = data;
        callers[taskId] = msg.sender;
        emit ResultReceived(taskId, data);
    }
}
