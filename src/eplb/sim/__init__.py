"""eplb.sim"""
